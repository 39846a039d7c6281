/* codec_walk.h: the one reader of the wire format, which the decoder, the validator and the metatable pass share. */
#ifndef HD_CODEC_WALK_H
#define HD_CODEC_WALK_H

#include <stddef.h>
#include <stdint.h>

#include "codec_int.h"

/* cx_walk_run reads a whole message: every tag, length, count and limit,
 * each bound checked inline, in one order, with one set of messages. What a
 * use builds as it goes is up to its cx_ops: the decoder pushes Lua values,
 * the validator builds nothing, the metatable pass (cx_mt_reach) follows
 * tables and references. The walker is a static inline function so that
 * each use is compiled with its own ops folded in: the validator, whose
 * ops are all NULL, pays for no call and no test of one.
 *
 * It reads iteratively, one frame per open table or function, and counts
 * the Lua stack slots the decoder holds at each point (its own slot, the
 * top-level values read so far, and per open table or function the table
 * or function and, while a value is read, its key), so that the limit on
 * them (CX_DEC_SLOTS) is the message's, whoever walks it. */

/* Where a value sits. In a frame's state, the low bits are where its next
 * value goes; WALK_MT_NEXT marks a table whose metatable follows its END.
 * CX_AT_ITEM: one of an ARRAY's first values, t[i] without its key. */
enum { CX_AT_KEY = 0, CX_AT_VALUE = 1, CX_AT_MT = 2, CX_AT_UPVAL = 3, CX_AT_TOP = 4,
       CX_AT_ITEM = 5 };
#define WALK_AT_MASK 7u
#define WALK_MT_NEXT 8u

/* What a value turned out to be, as far as where it sits needs to know:
 * keys cannot be nil or NaN, metatables must be tables. CX_K_NAMED: a named
 * value whose type only a lookup could tell. */
enum { CX_K_NIL, CX_K_NAN, CX_K_TABLE, CX_K_NAMED, CX_K_OTHER };

/* A hook's answer that ends the walk (cx_walk_run then returns
 * CX_WALK_STOPPED, with at just past the value). */
#define CX_STOP (-1)

/* What cx_walk_run returns. */
enum { CX_WALK_OK = 0, CX_WALK_BAD = -1, CX_WALK_STOPPED = 1 };

typedef struct cx_walk cx_walk;

/* A use's hooks, any of them NULL. Hooks are handed what the walker read and
 * never read bytes themselves; when one is called, w->p is just past what
 * was read and w->depth counts the open tables and functions around it.
 * `at` is where the value sits (CX_AT_*). A hook may raise a Lua error. */
typedef struct cx_ops {
  /* Nonzero when the Lua stack cannot grow by `slots`: before the values
   * (their count + CX_SPARE_SLOTS) and on opening a table or function. */
  int (*room)(cx_walk *w, int slots);
  /* nil, false, true, NULL, a number (its CX_NUM_BYTES bytes) or a string. */
  void (*scalar)(cx_walk *w, int tag, const unsigned char *s, size_t len);
  /* An INT: its zigzag varint. */
  void (*integer)(cx_walk *w, uint64_t zz);
  /* A KSET (s: its len bytes, kept in slot) or a KREF (s NULL: the string
   * slot holds). The walker has checked the slot. */
  void (*kstr)(cx_walk *w, int slot, const unsigned char *s, size_t len);
  /* A table opens: its size hints, and the bytes left after narr; `array`:
   * an ARRAY, whose items come first. */
  void (*table)(cx_walk *w, int at, int array, uint64_t narr, uint64_t nhash, size_t narr_left);
  /* A function opens (trusted only): its bytecode, then its upvalue count. */
  void (*func)(cx_walk *w, const unsigned char *bc, size_t len);
  void (*nups)(cx_walk *w, uint64_t nups);
  /* A reference to table or function number ref (below w->nrefs); returns
   * its CX_K_*. NULL: CX_K_TABLE. */
  int (*ref)(cx_walk *w, int at, uint64_t ref);
  /* A named value: mod, and field (NULL for a module). Returns its CX_K_*,
   * or CX_STOP. NULL: CX_K_NAMED. */
  int (*named)(cx_walk *w, int at, const unsigned char *mod, size_t mlen,
               const unsigned char *field, size_t flen);
  /* Upvalue i of the open function is upvalue n of function number ref. */
  void (*upjoin)(cx_walk *w, int i, uint64_t ref, uint64_t n);
  /* A value was read as a table's value, its item i (t[i]), its metatable,
   * or a function's upvalue i. */
  void (*field)(cx_walk *w);
  void (*item)(cx_walk *w, uint64_t i);
  /* A number that is item i: when set, called instead of scalar or integer
   * and then item. n is the number (an INT's value, a NUM's bits). */
  void (*num_item)(cx_walk *w, uint64_t i, double n);
  void (*metatable)(cx_walk *w);
  void (*upvalue)(cx_walk *w, int i);
  /* A table is complete (w->depth still counts it). */
  void (*close)(cx_walk *w);
} cx_ops;

struct cx_walk {
  const unsigned char *start, *end;
  void *ud;          /* the use's own state */
  uint64_t max_refs; /* more tables and functions: "too many tables" */
  int trusted;       /* FUNC records may appear */
  /* Kept current for hooks: */
  const unsigned char *p;
  int depth;
  uint64_t nrefs;  /* tables and functions opened so far */
  uint64_t nnamed; /* named values read before this one */
  uint64_t kslots; /* bit s: slot s holds a string (a KSET was read) */
  /* What the walk saw: */
  int saw_mt;         /* a table had a metatable */
  int named_in_table; /* a named value sat inside a table */
  /* Why it stopped: what (NULL: an unknown tag, `tag`), at byte `at`. */
  const char *what;
  int tag;
  size_t at;
};

static inline void cx_walk_init(cx_walk *w, const void *p, size_t len, int trusted, void *ud) {
  w->start = w->p = (const unsigned char *)p;
  w->end = w->start + len;
  w->ud = ud;
  w->max_refs = CX_MAX_REFS;
  w->trusted = trusted;
  w->depth = 0;
  w->nrefs = w->nnamed = 0;
  w->kslots = 0;
  w->saw_mt = w->named_in_table = 0;
  w->what = NULL;
  w->tag = 0;
  w->at = 0;
}

#if defined(__GNUC__)
#define WALK_INLINE static inline __attribute__((always_inline))
#else
#define WALK_INLINE static inline
#endif

typedef struct walk_frame {
  unsigned state; /* CX_AT_* of its next value, | WALK_MT_NEXT */
  uint64_t i, n;  /* a function: upvalues read, and its count; an ARRAY: items read */
} walk_frame;

/* An INT's zigzag varint as its number: even is zz / 2, odd is
 * -(zz / 2) - 1, computed in doubles so that no bits of a hostile varint
 * make a signed overflow. */
static inline double walk_int(uint64_t zz) {
  double n = (double)(zz >> 1);
  return (zz & 1) ? -n - 1 : n;
}

/* Whether a number's bits are a NaN's. */
static inline int walk_is_nan(const unsigned char *s) {
  uint64_t bits = hd_get_u64((const char *)s);
  return (bits & UINT64_C(0x7ff0000000000000)) == UINT64_C(0x7ff0000000000000) &&
         (bits & UINT64_C(0x000fffffffffffff)) != 0;
}

#define WALK_FAIL(msg) \
  do {                 \
    what = (msg);      \
    goto bad;          \
  } while (0)

/* Reads a varint into x, failing with `msg` when the message ends first. */
#define WALK_UV(x, msg)                                        \
  do {                                                         \
    if (p < end && *p < CX_UV_MORE) {                          \
      (x) = *p++;                                              \
    } else {                                                   \
      int rc_ = cx_uv_read(&p, end, &(x));                     \
      if (rc_ != 0) WALK_FAIL(rc_ == 1 ? (msg) : "varint too long"); \
    }                                                          \
  } while (0)

/* Reads a length into x and points s at the x bytes that follow. */
#define WALK_BYTES(s, x, msg)                           \
  do {                                                  \
    WALK_UV(x, msg);                                    \
    if ((x) > (uint64_t)(end - p)) WALK_FAIL(msg);      \
    (s) = p;                                            \
    p += (x);                                           \
  } while (0)

/* Where the value being read sits. */
#define WALK_AT() (depth > 0 ? (int)(f->state & WALK_AT_MASK) : CX_AT_TOP)

/* Calls a hook the ops have, with w->p and w->depth current: args is
 * the parenthesized argument list. */
#define WALK_HOOK(hook, args)  \
  do {                         \
    if (ops->hook != NULL) {   \
      w->p = p;                \
      w->depth = depth;        \
      ops->hook args;          \
    }                          \
  } while (0)

/* Opening a table or function: the nesting and the decoder's Lua stack.
 * The slots are counted before the stack is grown, so that only a caller
 * holding many slots of its own, or no memory, fails where hd_validate
 * does not. */
#define WALK_ENTER()                                                              \
  do {                                                                            \
    if (depth >= HD_MAX_DEPTH) WALK_FAIL("nested too deep");                      \
    if (1 + i + (uint64_t)depth + (uint64_t)nkeys + CX_SPARE_SLOTS > CX_DEC_SLOTS) \
      WALK_FAIL("nested too deep for the Lua stack");                             \
    if (ops->room != NULL) {                                                      \
      w->p = p;                                                                   \
      w->depth = depth;                                                           \
      if (ops->room(w, CX_SPARE_SLOTS) != 0) WALK_FAIL("nested too deep for the Lua stack"); \
    }                                                                             \
  } while (0)

/* Reads the message at w->start..w->end. Returns CX_WALK_OK; CX_WALK_BAD
 * with w->what and w->at (the message is refused); or CX_WALK_STOPPED when
 * a hook said CX_STOP. */
WALK_INLINE int cx_walk_run(cx_walk *w, const cx_ops *ops) {
  const unsigned char *const start = w->start, *const end = w->end;
  const unsigned char *p = start, *s, *s2;
  walk_frame frames[HD_MAX_DEPTH], *f = NULL;
  uint64_t n, i = 0, x, y;
  size_t left;
  const char *what = NULL;
  int depth = 0, nkeys = 0, kind = CX_K_OTHER, tag = 0;

  WALK_UV(n, "truncated value count");
  if (n > CX_MAX_VALUES) WALK_FAIL("too many values");
  /* Every value takes at least one byte. */
  if (n > (uint64_t)(end - p)) WALK_FAIL("truncated message");
  if (ops->room != NULL) {
    w->p = p;
    if (ops->room(w, (int)n + CX_SPARE_SLOTS) != 0) WALK_FAIL("too many values for the Lua stack");
  }
  if (n == 0) goto finish;

read: /* One value, at p. */
  if (p >= end) WALK_FAIL("truncated value");
  tag = *p++;
  switch (tag) {
    case CX_T_NIL:
      kind = CX_K_NIL;
      WALK_HOOK(scalar, (w, tag, p, 0));
      break;
    case CX_T_FALSE:
    case CX_T_TRUE:
    case CX_T_NULL:
      kind = CX_K_OTHER;
      WALK_HOOK(scalar, (w, tag, p, 0));
      break;
    case CX_T_NUM:
      if (end - p < CX_NUM_BYTES) WALK_FAIL("truncated number");
      kind = walk_is_nan(p) ? CX_K_NAN : CX_K_OTHER;
      p += CX_NUM_BYTES;
      if (ops->num_item != NULL && depth > 0 && (f->state & WALK_AT_MASK) == CX_AT_ITEM) {
        uint64_t bits = hd_get_u64((const char *)p - CX_NUM_BYTES);
        double n;
        memcpy(&n, &bits, sizeof n);
        WALK_HOOK(num_item, (w, f->i, n));
        goto entry;
      }
      WALK_HOOK(scalar, (w, tag, p - CX_NUM_BYTES, CX_NUM_BYTES));
      break;
    case CX_T_STR:
      WALK_BYTES(s, x, "truncated string");
      kind = CX_K_OTHER;
      WALK_HOOK(scalar, (w, tag, s, (size_t)x));
      break;
    case CX_T_INT:
      WALK_UV(x, "truncated number");
      kind = CX_K_OTHER;
      if (ops->num_item != NULL && depth > 0 && (f->state & WALK_AT_MASK) == CX_AT_ITEM) {
        WALK_HOOK(num_item, (w, f->i, walk_int(x)));
        goto entry;
      }
      WALK_HOOK(integer, (w, x));
      break;
    case CX_T_KSET:
    case CX_T_KREF: {
      unsigned slot;
      if (p >= end) WALK_FAIL("truncated string");
      slot = *p;
      if (slot >= CX_KSLOTS) WALK_FAIL("bad string slot");
      if (tag == CX_T_KREF && !(w->kslots & (UINT64_C(1) << slot)))
        WALK_FAIL("reference to a string not yet sent");
      p++;
      s = NULL;
      x = 0;
      if (tag == CX_T_KSET) {
        WALK_BYTES(s, x, "truncated string");
        w->kslots |= UINT64_C(1) << slot;
      }
      kind = CX_K_OTHER;
      WALK_HOOK(kstr, (w, (int)slot, s, (size_t)x));
      break;
    }
    case CX_T_TABLE:
    case CX_T_TABLE_MT:
    case CX_T_ARRAY:
    case CX_T_ARRAY_MT: {
      int array = tag == CX_T_ARRAY || tag == CX_T_ARRAY_MT;
      WALK_ENTER();
      WALK_UV(x, "truncated table");
      left = (size_t)(end - p);
      WALK_UV(y, "truncated table");
      if (w->nrefs == w->max_refs) WALK_FAIL("too many tables");
      WALK_HOOK(table, (w, WALK_AT(), array, x, y, left));
      w->nrefs++;
      f = &frames[depth++];
      f->state = (array ? CX_AT_ITEM : CX_AT_KEY) |
                 (tag == CX_T_TABLE_MT || tag == CX_T_ARRAY_MT ? WALK_MT_NEXT : 0);
      f->i = 0;
      goto entry;
    }
    case CX_T_REF:
      WALK_UV(x, "truncated reference");
      if (x >= w->nrefs) {
        p--;
        WALK_FAIL("reference to a value not yet sent");
      }
      kind = CX_K_TABLE;
      if (ops->ref != NULL) {
        w->p = p;
        w->depth = depth;
        kind = ops->ref(w, WALK_AT(), x);
      }
      break;
    case CX_T_FUNC:
      if (!w->trusted) {
        p--;
        WALK_FAIL("function where data was expected");
      }
      WALK_ENTER();
      WALK_BYTES(s, x, "truncated function");
      if (w->nrefs == w->max_refs) WALK_FAIL("too many tables");
      WALK_HOOK(func, (w, s, (size_t)x));
      w->nrefs++;
      WALK_UV(x, "truncated function");
      WALK_HOOK(nups, (w, x));
      f = &frames[depth++];
      f->state = CX_AT_UPVAL;
      f->i = 0;
      f->n = x;
      goto upvalue;
    case CX_T_NAMED_MOD:
    case CX_T_NAMED_FIELD:
      WALK_BYTES(s, x, "truncated name");
      s2 = NULL;
      y = 0;
      if (tag == CX_T_NAMED_FIELD) WALK_BYTES(s2, y, "truncated name");
      w->named_in_table |= depth > 0;
      kind = CX_K_NAMED;
      if (ops->named != NULL) {
        w->p = p;
        w->depth = depth;
        kind = ops->named(w, WALK_AT(), s, (size_t)x, s2, (size_t)y);
        if (kind == CX_STOP) {
          w->at = (size_t)(p - start);
          return CX_WALK_STOPPED;
        }
      }
      w->nnamed++;
      break;
    case CX_T_END:
      p--;
      WALK_FAIL("table end where a value was expected");
    case CX_T_UPJOIN:
      p--;
      WALK_FAIL("upvalue join where a value was expected");
    case CX_T_KEYS:
      p--;
      WALK_FAIL("keys marker where a value was expected");
    default:
      p--;
      goto bad;
  }

settle: /* A value of `kind` was read: hand it to its table or function, or count it. */
  if (depth == 0) {
    if (++i < n) goto read;
    goto finish;
  }
  switch (f->state & WALK_AT_MASK) {
    case CX_AT_KEY:
      if (kind == CX_K_NIL) WALK_FAIL("nil table key");
      if (kind == CX_K_NAN) WALK_FAIL("NaN table key");
      f->state |= CX_AT_VALUE;
      nkeys++;
      goto read;
    case CX_AT_VALUE:
      WALK_HOOK(field, (w));
      f->state &= ~(unsigned)CX_AT_VALUE;
      nkeys--;
      goto entry;
    case CX_AT_ITEM:
      WALK_HOOK(item, (w, f->i));
      goto entry;
    case CX_AT_MT:
      /* Only a lookup could tell whether a named value is a table: those
       * pass here, and cx_mt_reach refuses them. */
      if (kind != CX_K_TABLE && kind != CX_K_NAMED) WALK_FAIL("metatable is not a table");
      WALK_HOOK(metatable, (w));
      kind = CX_K_TABLE;
      goto close;
    default: /* CX_AT_UPVAL */
      WALK_HOOK(upvalue, (w, (int)f->i));
      goto upvalue;
  }

upvalue: /* The open function f expects its next upvalue, or is complete. */
  if (f->i == f->n) {
    kind = CX_K_OTHER;
    goto leave;
  }
  f->i++;
  if (p < end && *p == CX_T_UPJOIN) {
    p++;
    WALK_UV(x, "truncated upvalue join");
    WALK_UV(y, "truncated upvalue join");
    if (x >= w->nrefs) WALK_FAIL("bad reference in upvalue join");
    WALK_HOOK(upjoin, (w, (int)f->i, x, y));
    goto upvalue;
  }
  goto read;

entry: /* The open table f expects an item, a key, KEYS (after items) or its END. */
  if (p >= end) WALK_FAIL("truncated table");
  if (*p != CX_T_END) {
    if ((f->state & WALK_AT_MASK) == CX_AT_ITEM) {
      if (*p == CX_T_KEYS) {
        p++;
        f->state = (f->state & WALK_MT_NEXT) | CX_AT_KEY;
        goto entry;
      }
      f->i++;
    }
    goto read;
  }
  p++;
  if (f->state & WALK_MT_NEXT) {
    f->state = CX_AT_MT;
    w->saw_mt = 1;
    goto read;
  }
  kind = CX_K_TABLE;

close: /* Table f is complete. */
  WALK_HOOK(close, (w));

leave: /* f is complete: it is a value of `kind` where it sits. */
  f = --depth > 0 ? &frames[depth - 1] : NULL;
  goto settle;

finish:
  if (p != end) WALK_FAIL("trailing bytes");
  return CX_WALK_OK;

bad:
  w->what = what;
  w->tag = tag;
  w->at = (size_t)(p - start);
  return CX_WALK_BAD;
}

#endif
