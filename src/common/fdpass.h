/* fdpass.h: one message on a control socket, with at most one descriptor
 * attached (SCM_RIGHTS); shared by the core and the supervisor. */
#ifndef HD_FDPASS_H
#define HD_FDPASS_H

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Sends msg with fd attached (-1: none); like sendmsg, retrying EINTR. */
static inline ssize_t hd_send_fd(int sock, const void *msg, size_t len, int fd, int flags) {
  char cbuf[CMSG_SPACE(sizeof(int))];
  struct iovec iov;
  struct msghdr mh;
  ssize_t r;
  memset(&mh, 0, sizeof mh);
  iov.iov_base = (void *)msg;
  iov.iov_len = len;
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  if (fd >= 0) {
    struct cmsghdr *c;
    memset(cbuf, 0, sizeof cbuf);
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  do {
    r = sendmsg(sock, &mh, flags | MSG_NOSIGNAL);
  } while (r < 0 && errno == EINTR);
  return r;
}

/* Receives one message; *fd gets the first attached descriptor (close-on-
 * exec) or -1, and any further ones are closed: a peer cannot make us hold
 * descriptors we did not ask for. Like recvmsg otherwise. */
static inline ssize_t hd_recv_fd(int sock, void *buf, size_t len, int *fd, int flags) {
  char cbuf[CMSG_SPACE(sizeof(int) * 4)];
  struct iovec iov;
  struct msghdr mh;
  struct cmsghdr *c;
  ssize_t n;
  *fd = -1;
  memset(&mh, 0, sizeof mh);
  iov.iov_base = buf;
  iov.iov_len = len;
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cbuf;
  mh.msg_controllen = sizeof cbuf;
  n = recvmsg(sock, &mh, flags | MSG_CMSG_CLOEXEC);
  for (c = CMSG_FIRSTHDR(&mh); n >= 0 && c != NULL; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int *fds = (int *)CMSG_DATA(c);
      size_t k, nf = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (k = 0; k < nf; k++) {
        if (*fd < 0) *fd = fds[k];
        else close(fds[k]);
      }
    }
  }
  return n;
}

#endif
