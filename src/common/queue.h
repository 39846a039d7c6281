/* queue.h: the one intrusive doubly linked list, used for every list. */
#ifndef HD_QUEUE_H
#define HD_QUEUE_H

#include <stddef.h>

/* A list head and a list node are the same thing: an unlinked node points
 * to itself, so removal needs no list and removing twice is harmless. */
typedef struct hd_queue {
  struct hd_queue *next, *prev;
} hd_queue;

/* The struct of `type` whose member `field` is the node q. */
#define HD_QUEUE_DATA(q, type, field) ((type *)((char *)(q) - offsetof(type, field)))

static inline void hd_queue_init(hd_queue *q) {
  q->next = q->prev = q;
}

static inline int hd_queue_empty(const hd_queue *h) {
  return h->next == h;
}

/* Whether node q is on some list. */
static inline int hd_queue_linked(const hd_queue *q) {
  return q->next != q;
}

static inline hd_queue *hd_queue_head(const hd_queue *h) {
  return h->next == h ? NULL : h->next;
}

static inline void hd_queue_insert_tail(hd_queue *h, hd_queue *q) {
  q->next = h;
  q->prev = h->prev;
  h->prev->next = q;
  h->prev = q;
}

static inline void hd_queue_insert_head(hd_queue *h, hd_queue *q) {
  q->prev = h;
  q->next = h->next;
  h->next->prev = q;
  h->next = q;
}

static inline void hd_queue_remove(hd_queue *q) {
  q->prev->next = q->next;
  q->next->prev = q->prev;
  hd_queue_init(q);
}

/* Walks list h with q; the body may remove q (the next node is read first). */
#define HD_QUEUE_EACH(q, n, h) for ((q) = (h)->next, (n) = (q)->next; (q) != (h); (q) = (n), (n) = (q)->next)

#endif
