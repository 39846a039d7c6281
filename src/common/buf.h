/* buf.h: a growable byte buffer and the little-endian primitives of the wire format. */
#ifndef HD_BUF_H
#define HD_BUF_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct hd_buf {
  char *data;
  size_t len; /* bytes in use */
  size_t cap; /* bytes allocated */
} hd_buf;

#define HD_BUF_INIT {NULL, 0, 0}

/* Makes room for `extra` more bytes. Returns 0, or -1 when memory is out or
 * the size would overflow; the buffer is unchanged on failure. */
static inline int hd_buf_reserve(hd_buf *b, size_t extra) {
  size_t need, cap;
  char *p;
  if (extra <= b->cap - b->len) return 0;
  if (extra > SIZE_MAX / 2 - b->len) return -1;
  need = b->len + extra;
  cap = b->cap ? b->cap : 256;
  while (cap < need) cap *= 2;
  p = realloc(b->data, cap);
  if (p == NULL) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

static inline int hd_buf_append(hd_buf *b, const void *p, size_t n) {
  if (hd_buf_reserve(b, n) != 0) return -1;
  if (n) memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

/* Drops the first n bytes, keeping the rest. */
static inline void hd_buf_consume(hd_buf *b, size_t n) {
  if (n >= b->len) {
    b->len = 0;
    return;
  }
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
}

static inline void hd_buf_free(hd_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

static inline void hd_put_u32(char *p, uint32_t v) {
  unsigned char *u = (unsigned char *)p;
  u[0] = (unsigned char)v;
  u[1] = (unsigned char)(v >> 8);
  u[2] = (unsigned char)(v >> 16);
  u[3] = (unsigned char)(v >> 24);
}

static inline uint32_t hd_get_u32(const char *p) {
  const unsigned char *u = (const unsigned char *)p;
  return (uint32_t)u[0] | ((uint32_t)u[1] << 8) | ((uint32_t)u[2] << 16) |
         ((uint32_t)u[3] << 24);
}

static inline void hd_put_u64(char *p, uint64_t v) {
  hd_put_u32(p, (uint32_t)v);
  hd_put_u32(p + 4, (uint32_t)(v >> 32));
}

static inline uint64_t hd_get_u64(const char *p) {
  return (uint64_t)hd_get_u32(p) | ((uint64_t)hd_get_u32(p + 4) << 32);
}

#endif
