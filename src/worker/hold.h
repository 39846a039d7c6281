/* hold.h: the replies of a job's items, held back a little so that many go
 * to the host in one write (see hold.c for what makes them reach it). */
#ifndef HD_HOLD_H
#define HD_HOLD_H

#include <stddef.h>
#include <stdint.h>

/* Installs the timer's and the crashes' signal handlers and the exit hook,
 * for the reply pipe fd. Once, before the sandbox seals the process.
 * Returns 0 or -1. */
int hd_hold_setup(int fd);

/* Holds the bytes a then b (a STATS frame and a REPLY frame). Returns 0;
 * -1 when they do not fit (nothing is held of them: send what is held,
 * then them); -2 when the timer's send came due meanwhile and failed. */
int hd_hold_add(const char *a, size_t an, const char *b, size_t bn);

/* The bytes held. */
size_t hd_hold_bytes(void);

/* Sends what is held. Returns 0, or -1 when the pipe is gone. */
int hd_hold_send(void);

/* Sends what is held by a signal ns nanoseconds from now (ns > 0), or
 * takes that timer back (ns == 0). */
void hd_hold_timer(uint64_t ns);

/* Whether the timer is set. */
int hd_hold_armed(void);

#endif
