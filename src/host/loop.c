/* loop.c: the host's private libuv loop, the big buffer it keeps warm, and
 * the host's stdout and stderr as they were when it was made. */
#include "loop.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/timerfd.h>
#include <unistd.h>

/* Buffers kept warm: big enough to be worth it, small enough to hold. */
#define LOOP_SPARE_MIN 65536
#define LOOP_SPARE_MAX (256u << 20)

struct hd_loop {
  uv_loop_t uv;
  uv_poll_t wake;   /* watches wake_fd; never keeps the loop alive */
  int wake_fd;      /* a timerfd on CLOCK_MONOTONIC, or -1 */
  uint64_t wake_at; /* ms it is set for, UINT64_MAX when not set */
  hd_buf spare; /* one big buffer kept warm between big transfers */
  int spare_used; /* taken since the last age */
  int out[2];     /* copies of the host's stdout and stderr, or -1 */
};

/* The wake timer fired: its expiry is read, so the descriptor is quiet
 * again until the next one; the timers due run in the same loop turn. */
static void loop_wake_cb(uv_poll_t *h, int status, int events) {
  hd_loop *l = h->data;
  uint64_t n;
  (void)status;
  (void)events;
  while (read(l->wake_fd, &n, sizeof n) < 0 && errno == EINTR) {
  }
  l->wake_at = UINT64_MAX;
}

hd_loop *hd_loop_new(void) {
  int k;
  hd_loop *l = calloc(1, sizeof *l);
  if (l == NULL) return NULL;
  /* First, before the loop's own descriptors: a closed 1 or 2 stays -1. */
  for (k = 0; k < 2; k++) l->out[k] = fcntl(STDOUT_FILENO + k, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
  l->wake_at = UINT64_MAX;
  l->wake_fd = -1;
  if (uv_loop_init(&l->uv) != 0) goto fail;
  l->wake_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (l->wake_fd < 0 || uv_poll_init(&l->uv, &l->wake, l->wake_fd) != 0) {
    if (l->wake_fd >= 0) close(l->wake_fd);
    uv_loop_close(&l->uv);
    goto fail;
  }
  l->wake.data = l;
  uv_poll_start(&l->wake, UV_READABLE, loop_wake_cb);
  /* libuv adds a descriptor to its epoll instance when the loop runs, and
   * runs it only while something keeps it alive: one turn now, while the
   * wake timer still does, puts it in for good. */
  uv_run(&l->uv, UV_RUN_NOWAIT);
  uv_unref((uv_handle_t *)&l->wake);
  return l;
fail:
  for (k = 0; k < 2; k++)
    if (l->out[k] >= 0) close(l->out[k]);
  free(l);
  return NULL;
}

void hd_loop_free(hd_loop *l) {
  int k;
  uv_close((uv_handle_t *)&l->wake, NULL);
  /* Close callbacks of the last handles run here; then the loop is empty. */
  while (uv_loop_close(&l->uv) == UV_EBUSY) uv_run(&l->uv, UV_RUN_NOWAIT);
  hd_buf_free(&l->spare);
  close(l->wake_fd);
  for (k = 0; k < 2; k++)
    if (l->out[k] >= 0) close(l->out[k]);
  free(l);
}

static void loop_close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

/* The descriptors are fields of uv_loop_t that uv.h declares for unix
 * (UV_LOOP_PRIVATE_FIELDS) and uv_loop_fork replaces in the same way: the
 * backend (epoll) descriptor, the signal pipe every loop makes for its
 * child watcher, the async wakeup descriptors, and inotify's. A handle
 * may hold a descriptor too; those are the layers' own (hd_conn_forsake,
 * hd_sup_forsake). */
void hd_loop_forsake(hd_loop *l) {
  uv_loop_t *uv = &l->uv;
  int fd = uv_backend_fd(uv);
  if (fd >= 0) close(fd);
  uv->backend_fd = -1;
  loop_close_fd(&uv->signal_pipefd[0]);
  loop_close_fd(&uv->signal_pipefd[1]);
  if (uv->async_wfd != uv->async_io_watcher.fd) loop_close_fd(&uv->async_wfd);
  loop_close_fd(&uv->async_io_watcher.fd);
  uv->async_wfd = -1;
#if defined(__linux__)
  loop_close_fd(&uv->inotify_fd);
#endif
  loop_close_fd(&l->wake_fd);
  loop_close_fd(&l->out[0]);
  loop_close_fd(&l->out[1]);
}

int hd_loop_out_fd(const hd_loop *l, int which) {
  return which == 0 || which == 1 ? l->out[which] : -1;
}

uv_loop_t *hd_loop_uv(hd_loop *l) {
  return &l->uv;
}

int hd_loop_fd(hd_loop *l) {
  return uv_backend_fd(&l->uv);
}

/* Whether descriptors were started or changed since the loop last ran:
 * libuv tells the epoll instance about them only when it runs, so until
 * then the loop's descriptor cannot become readable for them. The queue is
 * a private field of uv_loop_t (UV_LOOP_PRIVATE_FIELDS), a list head of two
 * pointers that points to itself when empty, in every libuv 1.x. */
static int loop_watchers_pending(uv_loop_t *uv) {
  void **q = (void **)&uv->watcher_queue;
  return q[0] != (void *)q;
}

int hd_loop_timeout(hd_loop *l) {
  /* uv_backend_timeout says 0 for a loop with nothing to do, which would
   * have a host spin. */
  if (!uv_loop_alive(&l->uv)) return -1;
  if (loop_watchers_pending(&l->uv)) return 0;
  return uv_backend_timeout(&l->uv);
}

void hd_loop_sync_wake(hd_loop *l) {
  struct itimerspec its = {{0, 0}, {0, 0}};
  int t = hd_loop_timeout(l);
  uint64_t due;
  if (t < 0) return;
  /* The loop's clock may be the coarse one, up to a millisecond behind
   * CLOCK_MONOTONIC: a timer set a millisecond later finds the loop's
   * timer due. Work pending now wakes at once. */
  due = t == 0 ? 1 : uv_now(&l->uv) + (uint64_t)t + 1;
  if (due >= l->wake_at) return;
  its.it_value.tv_sec = (time_t)(due / 1000);
  its.it_value.tv_nsec = (long)(due % 1000) * 1000000L;
  if (timerfd_settime(l->wake_fd, TFD_TIMER_ABSTIME, &its, NULL) == 0) l->wake_at = due;
}

uint64_t hd_loop_now(hd_loop *l) {
  return uv_now(&l->uv);
}

void hd_loop_give_buf(hd_loop *l, hd_buf *b) {
  if (b->cap >= LOOP_SPARE_MIN && b->cap <= LOOP_SPARE_MAX && b->cap > l->spare.cap) {
    hd_buf_free(&l->spare);
    l->spare = *b;
    l->spare.len = 0;
  } else {
    hd_buf_free(b);
  }
  b->data = NULL;
  b->len = b->cap = 0;
}

int hd_loop_take_buf(hd_loop *l, hd_buf *b, size_t need) {
  if (l->spare.data == NULL || l->spare.cap < need || b->len != 0) return 0;
  hd_buf_free(b);
  *b = l->spare;
  l->spare.data = NULL;
  l->spare.len = l->spare.cap = 0;
  l->spare_used = 1;
  return 1;
}

void hd_loop_age_buf(hd_loop *l) {
  if (!l->spare_used) hd_buf_free(&l->spare);
  l->spare_used = 0;
}
