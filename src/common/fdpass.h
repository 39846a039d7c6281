/* fdpass.h: one message on a control socket, with a few descriptors
 * attached (SCM_RIGHTS); shared by the core and the supervisor. */
#ifndef HD_FDPASS_H
#define HD_FDPASS_H

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* The most descriptors one message carries. */
#define HD_FDPASS_MAX 4

/* Sends msg with the nfds descriptors of fds attached (nfds may be 0, at
 * most HD_FDPASS_MAX); like sendmsg, retrying EINTR. */
static inline ssize_t hd_send_fds(int sock, const void *msg, size_t len, const int *fds,
                                  int nfds, int flags) {
  char cbuf[CMSG_SPACE(sizeof(int) * HD_FDPASS_MAX)];
  struct iovec iov;
  struct msghdr mh;
  ssize_t r;
  memset(&mh, 0, sizeof mh);
  iov.iov_base = (void *)msg;
  iov.iov_len = len;
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  if (nfds > HD_FDPASS_MAX) {
    errno = EINVAL;
    return -1;
  }
  if (nfds > 0) {
    struct cmsghdr *c;
    memset(cbuf, 0, sizeof cbuf);
    mh.msg_control = cbuf;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
  }
  do {
    r = sendmsg(sock, &mh, flags | MSG_NOSIGNAL);
  } while (r < 0 && errno == EINTR);
  return r;
}

/* Sends msg with fd attached (-1: none). */
static inline ssize_t hd_send_fd(int sock, const void *msg, size_t len, int fd, int flags) {
  return hd_send_fds(sock, msg, len, &fd, fd >= 0 ? 1 : 0, flags);
}

/* Receives one message; fds[0..max-1] get the attached descriptors in
 * order (close-on-exec), -1 for those not sent, and any beyond `max` are
 * closed: a peer cannot make us hold descriptors we did not ask for. Like
 * recvmsg otherwise. */
static inline ssize_t hd_recv_fds(int sock, void *buf, size_t len, int *fds, int max,
                                  int flags) {
  char cbuf[CMSG_SPACE(sizeof(int) * HD_FDPASS_MAX)];
  struct iovec iov;
  struct msghdr mh;
  struct cmsghdr *c;
  ssize_t n;
  int got = 0, k;
  for (k = 0; k < max; k++) fds[k] = -1;
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
      size_t i, nf = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (i = 0; i < nf; i++) {
        int fd;
        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        if (got < max) fds[got++] = fd;
        else close(fd);
      }
    }
  }
  return n;
}

/* Receives one message; *fd gets the first attached descriptor or -1. */
static inline ssize_t hd_recv_fd(int sock, void *buf, size_t len, int *fd, int flags) {
  return hd_recv_fds(sock, buf, len, fd, 1, flags);
}

#endif
