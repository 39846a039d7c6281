/* bell.h: a doorbell for hosts that can wait only on sockets they connect
 * themselves (nginx's cosockets): a thread watches a descriptor and, once
 * the host has armed it, writes one byte to a unix socket the host
 * connected when the descriptor becomes readable. */
#ifndef HD_BELL_H
#define HD_BELL_H

#include <stddef.h>

typedef struct hd_bell hd_bell;

/* A bell watching `fd` (level-triggered: readable now rings at once), its
 * socket bound in a private directory under $TMPDIR (or /tmp). NULL, with
 * why in err, when it cannot be made.
 *
 * The protocol on a connection: the host writes any byte to arm the bell;
 * the bell writes one byte when `fd` is readable and is then disarmed until
 * armed again. A new connection replaces the previous one, disarmed. */
hd_bell *hd_bell_new(int fd, char *err, size_t errlen);

/* The socket's path, for connect(). */
const char *hd_bell_path(const hd_bell *b);

/* Stops the thread, closes everything, removes the socket and its
 * directory. */
void hd_bell_free(hd_bell *b);

/* In a forked child, where the thread does not exist: frees the memory.
 * The child's copies of the bell's descriptors were closed at the fork. */
void hd_bell_forsake(hd_bell *b);

#endif
