/* loop.c: the host's private libuv loop, the big buffer it keeps warm, and
 * the host's stdout and stderr as they were when it was made. */
#include "loop.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

/* Buffers kept warm: big enough to be worth it, small enough to hold. */
#define LOOP_SPARE_MIN 65536
#define LOOP_SPARE_MAX (256u << 20)

struct hd_loop {
  uv_loop_t uv;
  hd_buf spare; /* one big buffer kept warm between big transfers */
  int spare_used; /* taken since the last age */
  int out[2];     /* copies of the host's stdout and stderr, or -1 */
};

hd_loop *hd_loop_new(void) {
  int k;
  hd_loop *l = calloc(1, sizeof *l);
  if (l == NULL) return NULL;
  /* First, before the loop's own descriptors: a closed 1 or 2 stays -1. */
  for (k = 0; k < 2; k++) l->out[k] = fcntl(STDOUT_FILENO + k, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
  if (uv_loop_init(&l->uv) != 0) {
    for (k = 0; k < 2; k++)
      if (l->out[k] >= 0) close(l->out[k]);
    free(l);
    return NULL;
  }
  return l;
}

void hd_loop_free(hd_loop *l) {
  int k;
  /* Close callbacks of the last handles run here; then the loop is empty. */
  while (uv_loop_close(&l->uv) == UV_EBUSY) uv_run(&l->uv, UV_RUN_NOWAIT);
  hd_buf_free(&l->spare);
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
  loop_close_fd(&l->out[0]);
  loop_close_fd(&l->out[1]);
}

int hd_loop_out_fd(const hd_loop *l, int which) {
  return which == 0 || which == 1 ? l->out[which] : -1;
}

uv_loop_t *hd_loop_uv(hd_loop *l) {
  return &l->uv;
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
