/* loop.h: the host's private libuv loop, the big buffer it keeps warm, and
 * the host's stdout and stderr as they were when it was made. */
#ifndef HD_LOOP_H
#define HD_LOOP_H

#include <stdint.h>
#include <uv.h>

#include "buf.h"

typedef struct hd_loop hd_loop;

hd_loop *hd_loop_new(void);

/* Runs the close callbacks still due, closes the loop and frees it. Every
 * handle must have been closed. */
void hd_loop_free(hd_loop *l);

uv_loop_t *hd_loop_uv(hd_loop *l);

/* In a forked child: closes the child's copies of the loop's own
 * descriptors (its epoll instance, shared with the parent's loop, and its
 * internal pipes) without a libuv call, which would change the parent's
 * loop. The loop is never used again. */
void hd_loop_forsake(hd_loop *l);

/* Where workers' output goes: a copy of the host's descriptor 1 (which = 0)
 * or 2 (which = 1) taken when the loop was made, before any descriptor of
 * ours existed; -1 when the host had it closed. A copy, not the number: a
 * host that closed its stdout would otherwise have a descriptor of ours
 * (the supervisor's socket, say) take its place, and job output written
 * into it. */
int hd_loop_out_fd(const hd_loop *l, int which);

/* The loop's descriptor (its epoll instance) becomes readable when a
 * watched descriptor is ready; with the wake timer, also when the loop's
 * next timer is due or work is pending that needs no descriptor (close
 * callbacks), so a host that waits on the descriptor alone still runs
 * every deadline on time. hd_loop_sync_wake sets the wake timer from the
 * loop's timers: called after anything that may have started a timer or
 * made work pending. A wake too early is harmless: the host steps, and the
 * next sync sets the timer again. */
int hd_loop_fd(hd_loop *l);
void hd_loop_sync_wake(hd_loop *l);

/* Milliseconds until the loop has work that is not a descriptor's: 0 when
 * it has some now, -1 when it has none (no timer, or nothing that keeps
 * the loop alive). */
int hd_loop_timeout(hd_loop *l);

/* The loop's cached time, in ms. */
uint64_t hd_loop_now(hd_loop *l);

/* Big buffers are expensive to make (every page faults in) and frequent
 * when jobs move big data: the biggest one given back is kept for the next
 * big transfer. hd_loop_give_buf takes b's memory and leaves b empty;
 * hd_loop_take_buf moves the kept one into the empty b when it holds at
 * least `need`, and returns whether it did. */
void hd_loop_give_buf(hd_loop *l, hd_buf *b);
int hd_loop_take_buf(hd_loop *l, hd_buf *b, size_t need);

/* Called by the idle sweep: the kept buffer goes unless it was taken since
 * the last call. */
void hd_loop_age_buf(hd_loop *l);

#endif
