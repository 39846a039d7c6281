/* worker.h: the job loop of one worker process. */
#ifndef HD_WORKER_H
#define HD_WORKER_H

#include <sys/types.h>

/* Exit codes of a worker that could not serve: not a job's, which are the
 * job's own (os.exit). The host reports a worker's death either way. */
#define HD_EXIT_BAD_FRAME 71 /* the parent sent something that is not a job frame */
#define HD_EXIT_NO_MEMORY 72 /* no room for a job frame */
#define HD_EXIT_NO_SOCKET 73 /* the protocol pipes could not be put in place */
#define HD_EXIT_ORPHAN 74    /* the supervisor was gone before the worker started */
#define HD_EXIT_NO_DIR 75    /* the private directory could not be entered */
#define HD_EXIT_SANDBOX 76   /* the sandbox profile could not be applied */
#define HD_EXIT_JAILED 77    /* a sandboxed worker's isolation could not be made */

/* Builds the pristine state every job starts from, with `path` and `cpath`
 * as its package.path and cpath. Called once, in the supervisor, before it
 * forks any worker. */
int hd_worker_prepare(const char *path, const char *cpath);

/* Returns a malloc'd copy of a ';'-separated module path whose relative
 * entries are made absolute against `cwd` (NULL: the current directory). */
char *hd_worker_abspaths(const char *paths, const char *cwd);

/* Serves jobs on `fd` until the parent closes it, or until a job tainted
 * the process, or after one job in the "syscalls" profile; returns the exit
 * code. `pid` is the worker's as the host sees it, for its hello. */
int hd_worker_run(int fd, int flags, pid_t pid);

#endif
