/* suplink.h: the host's link to the supervisor process, which forks, reaps
 * and kills the workers. Orders go down; reports come up through callbacks. */
#ifndef HD_SUPLINK_H
#define HD_SUPLINK_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "loop.h"
#include "wire.h"

typedef struct hd_sup hd_sup;

typedef struct hd_sup_cbs {
  /* Worker `id` runs as `pid`; `pidfd` (or -1) names exactly that process
   * and now belongs to the callee. */
  void (*spawned)(void *ud, uint32_t id, pid_t pid, int pidfd);
  /* Worker `id` is gone; `status` is its wait status, or -1 when it could
   * not be started or is not known. */
  void (*exited)(void *ud, uint32_t id, int status);
  /* Worker `id` could not be started, for `why` (a sentence); `exited`
   * follows with -1. */
  void (*failed)(void *ud, uint32_t id, const char *why);
  /* The supervisor is gone or unusable, for `why`: every worker it held is
   * gone with it. The link is down already; no `exited` follows. */
  void (*lost)(void *ud, const char *why);
} hd_sup_cbs;

hd_sup *hd_sup_new(hd_loop *l, const char *worker_path, const hd_sup_cbs *cbs, void *ud);

/* Closes the link: `lost` is called ("shut down"); the supervisor kills its
 * workers and exits, and is waited for (a second at most) and reaped. */
void hd_sup_close(hd_sup *s);

/* In a forked child: closes the child's copies of the link's descriptors
 * (the control socket, the pidfds, the worker sockets waiting to be sent)
 * without a libuv call and without a word to the supervisor, which is the
 * parent's; the link is never used again. */
void hd_sup_forsake(hd_sup *s);

/* Closes the link if it is up, then frees. */
void hd_sup_free(hd_sup *s);

/* The bytecode header the supervisor's VM must have (the host VM's). */
void hd_sup_set_bchead(hd_sup *s, const char *bc, size_t n);

/* Starts the supervisor unless it runs, with the module paths its image is
 * built with. Returns 1 when it started one, 0 when one runs, -1 when none
 * can run (hd_sup_error says why). */
int hd_sup_ensure(hd_sup *s, const char *path, const char *cpath);

const char *hd_sup_error(const hd_sup *s);

/* Orders. `fds` (hd_sup_spawn: the worker's reply pipe, stdout, stderr and
 * job pipe, in the order of wire.h's HD_SPAWN_FD_*) are attached and closed here,
 * whatever happens. Each returns 0, or -1 when it could not be sent. */
int hd_sup_spawn(hd_sup *s, uint32_t id, int flags, const char *name,
                 const int fds[HD_SPAWN_FDS]);
int hd_sup_kill(hd_sup *s, uint32_t id);

/* Reads the reports already sent, without blocking. */
void hd_sup_drain(hd_sup *s);

/* Descriptors held in orders not yet sent (a worker's pipes
 * wait here while the supervisor is slow to read). For tests. */
int hd_sup_held_fds(const hd_sup *s);

/* The supervisor's pid while the link is up, else -1. */
pid_t hd_sup_pid(const hd_sup *s);

/* Reaps supervisors that were let go while still exiting. */
void hd_sup_reap(hd_sup *s);

#endif
