/* hold.c: the replies of a job's items, held back a little so that many go
 * to the host in one write and wake it once.
 *
 * A held reply must still reach the host whatever the items after it do:
 * an interval timer sends what is held HD_ITEM_HOLD_MS after the last send
 * (an item that hangs), a crash sends it before the process dies of its
 * signal, and exit() sends it before the process ends (os.exit). The signal
 * handlers only read the buffer and write it to the reply pipe, both safe in a
 * handler; the job loop marks the few instructions in which it changes the
 * buffer, and a handler that lands in them leaves the send to the loop. */
#include "hold.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "wire.h"

/* What is held: whole frames, at most this many bytes (a reply that does
 * not fit goes out on its own). */
#define HOLD_CAP (64 * 1024)

static char hold_buf[HOLD_CAP];
static int hold_fd = -1;
static volatile sig_atomic_t hold_len;   /* bytes held */
static volatile sig_atomic_t hold_busy;  /* the job loop is changing hold_buf */
static volatile sig_atomic_t hold_late;  /* the timer came while it was */
static volatile sig_atomic_t hold_armed; /* the timer is set */

/* Signals whose default action ends the process (a crash, abort, a write
 * to a closed pipe or past RLIMIT_FSIZE, a signal from elsewhere): the held
 * replies go out, then the process dies of the signal as it would have.
 * SIGALRM is the timer's; SIGKILL and SIGSTOP cannot be caught. */
static const int hold_fatal[] = {SIGSEGV, SIGBUS,  SIGILL,  SIGFPE,    SIGABRT, SIGTRAP,
                                 SIGSYS,  SIGPIPE, SIGXFSZ, SIGXCPU,   SIGHUP,  SIGINT,
                                 SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2,   SIGPROF, SIGVTALRM,
                                 SIGIO,   SIGPWR,  SIGSTKFLT};

/* The handlers' own stack: a crash of a C stack overflow has none left. */
static char hold_stack[16384] __attribute__((aligned(16)));

/* Writes what is held to the reply pipe, whole; safe in a signal handler.
 * Returns -1 when the pipe is gone (what was held is dropped; the SIGPIPE
 * that comes with it ends the worker). */
static int hold_write(void) {
  size_t n = (size_t)hold_len, off = 0;
  while (off < n) {
    ssize_t r = write(hold_fd, hold_buf + off, n - off);
    if (r < 0) {
      if (errno == EINTR) continue;
      hold_len = 0;
      return -1;
    }
    off += (size_t)r;
  }
  hold_len = 0;
  return 0;
}

/* Every writer marks the buffer busy while it writes, so that a signal
 * landing meanwhile does not send the same bytes again: the timer then
 * leaves its send to the writer it interrupted, and a crash lets the
 * interrupted write be the last (a frame it cuts short ends the job as the
 * crash does). */
static void hold_on_timer(int sig) {
  int e = errno;
  (void)sig;
  hold_armed = 0;
  if (hold_busy) {
    hold_late = 1;
  } else {
    hold_busy = 1;
    (void)hold_write();
    hold_busy = 0;
  }
  errno = e;
}

/* SA_RESETHAND made the signal's action the default again: the faulting
 * instruction, run again, ends the process, and so does the signal raised
 * again (abort, a signal sent from elsewhere). */
static void hold_on_fatal(int sig) {
  if (!hold_busy) {
    hold_busy = 1;
    (void)hold_write();
  }
  raise(sig);
}

static void hold_at_exit(void) {
  (void)hd_hold_send();
}

int hd_hold_setup(int fd) {
  struct sigaction sa;
  stack_t st;
  size_t i;
  hold_fd = fd;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  /* A job's system calls go on after the timer (read, write, waitpid). */
  sa.sa_flags = SA_RESTART;
  sa.sa_handler = hold_on_timer;
  if (sigaction(SIGALRM, &sa, NULL) != 0) return -1;
  st.ss_sp = hold_stack;
  st.ss_size = sizeof hold_stack;
  st.ss_flags = 0;
  if (sigaltstack(&st, NULL) != 0) return -1;
  sa.sa_flags = SA_ONSTACK | SA_RESETHAND | SA_NODEFER;
  sa.sa_handler = hold_on_fatal;
  for (i = 0; i < sizeof hold_fatal / sizeof hold_fatal[0]; i++)
    if (sigaction(hold_fatal[i], &sa, NULL) != 0) return -1;
  return atexit(hold_at_exit) == 0 ? 0 : -1;
}

int hd_hold_add(const char *a, size_t an, const char *b, size_t bn) {
  size_t at;
  hold_busy = 1;
  atomic_signal_fence(memory_order_seq_cst);
  at = (size_t)hold_len;
  if (an + bn > HOLD_CAP - at) {
    hold_busy = 0;
    return -1;
  }
  memcpy(hold_buf + at, a, an);
  memcpy(hold_buf + at + an, b, bn);
  hold_len = (sig_atomic_t)(at + an + bn);
  atomic_signal_fence(memory_order_seq_cst);
  hold_busy = 0;
  /* The timer came meanwhile: its send is due now. */
  if (hold_late) return hd_hold_send() == 0 ? 0 : -2;
  return 0;
}

size_t hd_hold_bytes(void) {
  return (size_t)hold_len;
}

int hd_hold_send(void) {
  int rc;
  hold_busy = 1;
  atomic_signal_fence(memory_order_seq_cst);
  rc = hold_write();
  hold_late = 0;
  atomic_signal_fence(memory_order_seq_cst);
  hold_busy = 0;
  return rc;
}

void hd_hold_timer(uint64_t ns) {
  struct itimerval it;
  memset(&it, 0, sizeof it);
  if (ns > 0) {
    it.it_value.tv_sec = (time_t)(ns / 1000000000u);
    it.it_value.tv_usec = (suseconds_t)((ns % 1000000000u) / 1000u);
    if (it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0) it.it_value.tv_usec = 1;
  } else if (!hold_armed) {
    return;
  }
  if (setitimer(ITIMER_REAL, &it, NULL) == 0) hold_armed = ns > 0;
}

int hd_hold_armed(void) {
  return hold_armed;
}
