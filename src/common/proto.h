/* proto.h: the two protocols: job frames between the parent and a worker,
 * and control messages between the parent and the supervisor. */
#ifndef HD_PROTO_H
#define HD_PROTO_H

#include <stdint.h>

/* Bumped whenever either protocol changes; the supervisor's hello carries it
 * so a worker executable from another build is refused with a clear error. */
#define HD_PROTO_VERSION 1

/* The worker's protocol socket is always this descriptor, so a job's print
 * (fd 1) and its errors (fd 2) never touch the protocol. */
#define HD_WORKER_FD 3

/* A job frame, either direction, over a SOCK_STREAM socketpair:
 *   u32 body length | u8 type | u64 job id | body
 * All integers are little-endian. */
#define HD_FRAME_HEADER 13
#define HD_FRAME_JOB 1   /* parent → worker: u64 max_heap_bytes, u64 max_output_bytes,
                          * u8 flags, [paths], [env], codec message */
/* Job flags. With HD_JOB_PATHS, package.path and package.cpath follow the
 * flags (u32 length and bytes each): the caller changed them after the
 * supervisor built its image. With HD_JOB_ENV, a u32 count of environment
 * variables follows, each a name and a value (u32 length and bytes each). */
#define HD_JOB_PATHS 1
#define HD_JOB_ENV 2
#define HD_FRAME_REPLY 2 /* worker → parent: u8 status, codec message */
#define HD_FRAME_REPLY_LAST 3 /* the same, and the worker exits after it */
#define HD_FRAME_HELLO 4 /* worker → parent, first: u32 pid (job id 0) */

/* Reply statuses. */
#define HD_REPLY_OK 0        /* message: the results */
#define HD_REPLY_ERROR 1     /* message: the raised value, its traceback */
#define HD_REPLY_OOM 2       /* message: empty */
#define HD_REPLY_BADRESULT 3 /* message: one string, why the results cannot travel */

/* The largest job frame a worker accepts; the parent's own limit on replies
 * is max_result_bytes. */
#define HD_MAX_JOB_FRAME (1u << 30)

/* Control messages over a SOCK_SEQPACKET pair, one message per packet:
 * u8 type, then fields. */
#define HD_CTL_SPAWN 1   /* parent → supervisor: u32 worker id, u8 flags; one fd attached */
#define HD_SPAWN_LUA 1     /* sandbox: the stripped Lua environment */
#define HD_SPAWN_SECCOMP 2 /* sandbox: limits and the system call filter */
#define HD_CTL_KILL 2    /* parent → supervisor: u32 worker id */
#define HD_CTL_HELLO 1   /* supervisor → parent: u32 version, u32 pid, u8 n, n bytes of bytecode header */
#define HD_CTL_SPAWNED 2 /* supervisor → parent: u32 worker id, u32 pid; a pidfd attached */
#define HD_CTL_EXITED 3  /* supervisor → parent: u32 worker id, i32 wait status */
#define HD_CTL_FAILED 4  /* supervisor → parent: u32 worker id, i32 errno */
#define HD_CTL_MAX 64

/* Every worker's file size limit (RLIMIT_FSIZE). */
#define HD_WORKER_FSIZE (1ull << 30)

/* Bytes of a bytecode dump that identify the VM's bytecode format. */
#define HD_BCHEAD 5

#endif
