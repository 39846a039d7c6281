/* jail.h: the isolation of a sandboxed worker: its own namespaces, a file
 * system of its own, no privileges. SECURITY.md says what a job sees. */
#ifndef HD_JAIL_H
#define HD_JAIL_H

#include <stdint.h>
#include <sys/types.h>

/* The user and group a sandboxed job runs as. */
#define HD_JAIL_UID 65534
#define HD_JAIL_GID 65534

/* Notes the directories of the module paths (';'-separated templates,
 * absolute) that jobs may read, and how namespaces are made here: with a
 * user namespace unless the supervisor runs as root. `refuse` set: every
 * jailed spawn fails as if namespaces were unavailable. Call once, before
 * any hd_jail_fork. Returns 0, or -1 when memory runs out. */
int hd_jail_init(const char *path, const char *cpath, int refuse);

/* Forks a worker into new user (unless root), PID, mount, IPC, network,
 * UTS and cgroup namespaces, with `dir` (an empty private directory) as
 * its writable /tmp, and waits until it is jailed. In the parent: the
 * child's pid, or -1 with *why set to an HD_FAIL_* code (wire.h) or'ed
 * with the errno of the step that failed. In the child: 0, running in its
 * jail as HD_JAIL_UID without capabilities, with no_new_privs, its current
 * directory /tmp; *why is 0. The child is pid 1 of its PID namespace. */
pid_t hd_jail_fork(const char *dir, uint32_t *why);

/* In a jailed child: its pid as the supervisor and the host see it. */
pid_t hd_jail_outer_pid(void);

#endif
