/* codec_validate.c: a worker's reply checked without a lua_State, the metatable rule for hostile messages, and a reply's shape. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "codec_int.h"

/* ------------------------------------------------------------------------ */
/* Metatables in hostile messages                                           */
/* ------------------------------------------------------------------------ */

/* A result is data, but a metatable makes ordinary uses of it (t.x,
 * tostring(t), t == u) call functions, and the only functions a hostile
 * message can hold are the host's own, sent by name. So a hostile message
 * is refused when a metatable reaches a named value it counts (hd_decode:
 * one that turned out to be a function; hd_validate, which cannot look
 * names up: any). A metatable reaches the tables nested in it, their
 * metatables, and through references whatever those reach, wherever it was
 * first sent: reach rather than nesting, so that the verdict does not depend
 * on where the encoder happened to write a shared table first. Data-only
 * metatables, and named values no metatable reaches, still travel.
 *
 * cx_mt_reach checks this in one more pass over a message already known to
 * be well formed, needed only when it has a metatable and a counted named
 * value inside a table. A table's reach is its subtree (the tables nested in
 * it, metatables included) and the reach of every table a reference inside
 * that subtree points to. References point back only: to a table complete
 * already, whose verdict is known, or to one still open around the
 * reference, whose reach then equals this table's own; such a table is
 * linked to the outermost one and shares its verdict once that one closes
 * (union-find, so linear time). Per table it keeps one word: */
#define MR_ROOT (UINT64_C(1) << 63) /* used as a metatable */
#define MR_LINK (UINT64_C(1) << 61) /* verdict is that of the table numbered below */
#define MR_OPEN (UINT64_C(2) << 61) /* still open, at the depth below */
#define MR_TAG (UINT64_C(3) << 61)  /* none of these: closed, and below is the verdict */
#define MR_VAL ((UINT64_C(1) << 61) - 1)

/* Where an open table is: reading a key, reading a value, reading its
 * metatable; VS_MT_NEXT marks a table whose metatable follows its END. */
enum { VS_KEY = 0, VS_VALUE = 1, VS_MT = 2, VS_MT_NEXT = 4 };

typedef struct mr_frame {
  uint64_t ref;
  uint64_t acc; /* offset just after a counted named value it reaches, or 0 */
  int up;       /* depth of the outermost open table a reference in it leads to */
  unsigned state;
} mr_frame;

/* Follows the links from table x to the table whose verdict it shares,
 * shortening the path on the way. */
static uint64_t mr_find(uint64_t *st, uint64_t x) {
  uint64_t r = x, next;
  while ((st[r] & MR_TAG) == MR_LINK) r = st[r] & MR_VAL;
  while (x != r) {
    next = st[x] & MR_VAL;
    st[x] = (st[x] & MR_ROOT) | MR_LINK | r;
    x = next;
  }
  return r;
}

/* Returns 0 when no metatable of the message (well formed, of ntables
 * tables) reaches a named value that `counts` (NULL: every one), otherwise
 * the offset just after such a named value. st has room for ntables words.
 * It still checks every bound: what it cannot parse, it refuses. */
size_t cx_mt_reach(const unsigned char *start, size_t len, uint64_t *st,
                          uint64_t ntables, cx_counts_fn counts, void *ud) {
  const unsigned char *p = start, *end = start + len;
  mr_frame frames[HD_MAX_DEPTH];
  mr_frame *f = NULL;
  uint64_t n, i = 0, x, ntab = 0, nnamed = 0;
  int depth = 0, tag;

  if (cx_uv_read(&p, end, &n) != 0) goto odd;
  if (n == 0) goto done;
read:
  if (p >= end) goto odd;
  tag = *p++;
  switch (tag) {
    case CX_T_NIL:
    case CX_T_FALSE:
    case CX_T_TRUE:
      break;
    case CX_T_NUM:
      if (end - p < 8) goto odd;
      p += 8;
      break;
    case CX_T_STR:
      if (cx_uv_read(&p, end, &x) != 0 || x > (uint64_t)(end - p)) goto odd;
      p += x;
      break;
    case CX_T_TABLE:
    case CX_T_TABLE_MT:
      if (depth >= HD_MAX_DEPTH || ntab >= ntables) goto odd;
      if (cx_uv_read(&p, end, &x) != 0 || cx_uv_read(&p, end, &x) != 0) goto odd;
      st[ntab] = MR_OPEN | (uint64_t)depth |
                 (depth > 0 && (f->state & 3) == VS_MT ? MR_ROOT : 0);
      f = &frames[depth];
      f->ref = ntab++;
      f->acc = 0;
      f->up = depth++;
      f->state = tag == CX_T_TABLE_MT ? VS_MT_NEXT : VS_KEY;
      goto entry;
    case CX_T_REF:
      if (cx_uv_read(&p, end, &x) != 0 || x >= ntab) goto odd;
      if (depth > 0) {
        uint64_t r = mr_find(st, x);
        if ((f->state & 3) == VS_MT) st[x] |= MR_ROOT;
        if ((st[r] & MR_TAG) == MR_OPEN) {
          if ((int)(st[r] & MR_VAL) < f->up) f->up = (int)(st[r] & MR_VAL);
        } else if (f->acc == 0) {
          f->acc = st[r] & MR_VAL;
        }
      }
      break;
    case CX_T_NAMED_MOD:
    case CX_T_NAMED_FIELD:
      if (cx_uv_read(&p, end, &x) != 0 || x > (uint64_t)(end - p)) goto odd;
      p += x;
      if (tag == CX_T_NAMED_FIELD) {
        if (cx_uv_read(&p, end, &x) != 0 || x > (uint64_t)(end - p)) goto odd;
        p += x;
      }
      if (depth > 0 && (counts == NULL || counts(ud, nnamed))) {
        /* A named metatable is refused at once; otherwise the table it is
         * in now reaches it. */
        if ((f->state & 3) == VS_MT) return (size_t)(p - start);
        if (f->acc == 0) f->acc = (uint64_t)(p - start);
      }
      nnamed++;
      break;
    default:
      goto odd;
  }

settle: /* A value was read: hand it to its table, or count it. */
  if (depth == 0) {
    if (++i < n) goto read;
    goto done;
  }
  switch (f->state & 3) {
    case VS_KEY:
      f->state |= VS_VALUE;
      goto read;
    case VS_VALUE:
      f->state &= ~(unsigned)VS_VALUE;
      goto entry;
    default:
      goto close;
  }

entry: /* The open table f expects a key or its END. */
  if (p >= end) goto odd;
  if (*p != CX_T_END) goto read;
  p++;
  if (f->state & VS_MT_NEXT) {
    f->state = VS_MT;
    goto read;
  }

close: /* Table f is complete: settle its verdict, or link it. */
  {
    uint64_t *s = &st[f->ref];
    int d = --depth;
    if (f->up < d)
      *s = (*s & MR_ROOT) | MR_LINK | frames[f->up].ref;
    else
      *s = (*s & MR_ROOT) | f->acc;
    if (d > 0) {
      mr_frame *outer = &frames[d - 1];
      if (outer->acc == 0) outer->acc = f->acc;
      if (f->up < outer->up) outer->up = f->up;
      f = outer;
    } else {
      f = NULL;
    }
  }
  goto settle;

done:
  for (x = 0; x < ntab; x++) {
    if (st[x] & MR_ROOT) {
      uint64_t v = st[mr_find(st, x)] & MR_VAL;
      if (v != 0) return (size_t)v;
    }
  }
  return 0;
odd:
  return p > start ? (size_t)(p - start) : 1;
}

/* ------------------------------------------------------------------------ */
/* Validator                                                                */
/* ------------------------------------------------------------------------ */

/* hd_validate walks a message the way hd_decode(…, 0) reads it, with the
 * same checks in the same order and the same messages, but builds nothing:
 * an explicit stack of the open tables stands for the decoder's recursion,
 * and the decoder's Lua stack use is counted to apply CX_DEC_SLOTS. The
 * metatable rule takes cx_mt_reach's second pass, only for messages that
 * have a metatable and a named value inside a table. */

/* What a value turned out to be, as far as its table needs to know. */
enum { VAL_NIL, VAL_NAN, VAL_TABLE, VAL_NAMED, VAL_OTHER };

/* cx_mt_reach's words for this many tables fit on the C stack. */
#define VAL_REACH_INLINE 512

typedef struct val_frame {
  unsigned state; /* VS_* */
} val_frame;

/* Reads a varint into x, failing with `msg` when the message ends first. */
#define VAL_UV(x, msg)                              \
  do {                                               \
    if (p < end && *p < 0x80) {                      \
      (x) = *p++;                                    \
    } else {                                         \
      int rc_ = cx_uv_read(&p, end, &(x));              \
      if (rc_ != 0) {                                \
        what = rc_ == 1 ? (msg) : "varint too long"; \
        goto bad;                                    \
      }                                              \
    }                                                \
  } while (0)

#define VAL_FAIL(msg) \
  do {                 \
    what = (msg);      \
    goto bad;          \
  } while (0)

int hd_validate(const char *msg, size_t len, char *err, size_t errlen) {
  const unsigned char *start = (const unsigned char *)msg, *p = start, *end = start + len;
  val_frame frames[HD_MAX_DEPTH];
  val_frame *f = NULL;
  uint64_t n, i = 0, x, nrefs = 0;
  const char *what = NULL;
  int depth = 0, nvalue = 0, kind = VAL_OTHER, tag = 0, has_mt = 0, has_named = 0;

  VAL_UV(n, "truncated value count");
  if (n > CX_MAX_VALUES) VAL_FAIL("too many values");
  if (n > (uint64_t)(end - p)) VAL_FAIL("truncated message");
  if (n == 0) goto finish;

read: /* One value, at p. */
  if (p >= end) VAL_FAIL("truncated value");
  tag = *p++;
  switch (tag) {
    case CX_T_NIL:
      kind = VAL_NIL;
      break;
    case CX_T_FALSE:
    case CX_T_TRUE:
      kind = VAL_OTHER;
      break;
    case CX_T_NUM: {
      uint64_t bits;
      if (end - p < 8) VAL_FAIL("truncated number");
      bits = hd_get_u64((const char *)p);
      p += 8;
      kind = (bits & UINT64_C(0x7ff0000000000000)) == UINT64_C(0x7ff0000000000000) &&
                     (bits & UINT64_C(0x000fffffffffffff)) != 0
                 ? VAL_NAN
                 : VAL_OTHER;
      break;
    }
    case CX_T_STR:
      VAL_UV(x, "truncated string");
      if (x > (uint64_t)(end - p)) VAL_FAIL("truncated string");
      p += x;
      kind = VAL_OTHER;
      break;
    case CX_T_TABLE:
    case CX_T_TABLE_MT:
      /* dec_enter. The decoder's stack then holds its ref slot, the
       * top-level values read so far, and per open table the table and,
       * while its value is read, the key. */
      if (depth >= HD_MAX_DEPTH) VAL_FAIL("nested too deep");
      if (1 + i + (uint64_t)depth + (uint64_t)nvalue + 8 > CX_DEC_SLOTS)
        VAL_FAIL("nested too deep for the Lua stack");
      VAL_UV(x, "truncated table");
      VAL_UV(x, "truncated table");
      if (nrefs == INT32_MAX) VAL_FAIL("too many tables");
      nrefs++;
      f = &frames[depth++];
      f->state = tag == CX_T_TABLE_MT ? VS_MT_NEXT : VS_KEY;
      goto entry;
    case CX_T_REF:
      VAL_UV(x, "truncated reference");
      if (x >= nrefs) {
        p--;
        VAL_FAIL("reference to a value not yet sent");
      }
      kind = VAL_TABLE;
      break;
    case CX_T_FUNC:
      p--;
      VAL_FAIL("function where data was expected");
    case CX_T_NAMED_MOD:
    case CX_T_NAMED_FIELD:
      VAL_UV(x, "truncated name");
      if (x > (uint64_t)(end - p)) VAL_FAIL("truncated name");
      p += x;
      if (tag == CX_T_NAMED_FIELD) {
        VAL_UV(x, "truncated name");
        if (x > (uint64_t)(end - p)) VAL_FAIL("truncated name");
        p += x;
      }
      has_named |= depth > 0;
      kind = VAL_NAMED;
      break;
    case CX_T_END:
      p--;
      VAL_FAIL("table end where a value was expected");
    case CX_T_UPJOIN:
      p--;
      VAL_FAIL("upvalue join where a value was expected");
    default:
      p--;
      goto bad;
  }

settle: /* A value of `kind` was read: hand it to its table, or count it. */
  if (depth == 0) {
    if (++i < n) goto read;
    goto finish;
  }
  switch (f->state & 3) {
    case VS_KEY:
      if (kind == VAL_NIL) VAL_FAIL("nil table key");
      if (kind == VAL_NAN) VAL_FAIL("NaN table key");
      f->state |= VS_VALUE;
      nvalue++;
      goto read;
    case VS_VALUE:
      f->state &= ~(unsigned)VS_VALUE;
      nvalue--;
      goto entry;
    default: /* VS_MT */
      /* Only a lookup could tell whether a named value is a table; the
       * decoder takes named tables and refuses named functions here, and
       * cx_mt_reach refuses both. */
      if (kind != VAL_TABLE && kind != VAL_NAMED) VAL_FAIL("metatable is not a table");
      f = --depth > 0 ? &frames[depth - 1] : NULL;
      kind = VAL_TABLE;
      goto settle;
  }

entry: /* The open table f expects a key or its END. */
  if (p >= end) VAL_FAIL("truncated table");
  if (*p != CX_T_END) goto read;
  p++;
  if (f->state & VS_MT_NEXT) {
    f->state = VS_MT;
    has_mt = 1;
    goto read;
  }
  f = --depth > 0 ? &frames[depth - 1] : NULL;
  kind = VAL_TABLE;
  goto settle;

finish:
  if (p != end) VAL_FAIL("trailing bytes");
  if (has_mt && has_named) {
    uint64_t inline_st[VAL_REACH_INLINE], *st = inline_st;
    size_t at;
    /* A table takes four bytes at least, so this is at most 2 * len. */
    if (nrefs > VAL_REACH_INLINE && (st = malloc((size_t)nrefs * sizeof *st)) == NULL) {
      if (err != NULL && errlen > 0) snprintf(err, errlen, "handler: out of memory");
      return -1;
    }
    at = cx_mt_reach(start, len, st, nrefs, NULL, NULL);
    if (st != inline_st) free(st);
    if (at != 0) {
      p = start + at;
      VAL_FAIL(CX_MSG_NAMED_MT);
    }
  }
  return 0;

bad:
  if (err != NULL && errlen > 0) {
    if (what != NULL)
      snprintf(err, errlen, "handler: bad message: %s at byte %zu", what, (size_t)(p - start));
    else
      snprintf(err, errlen, "handler: bad message: unknown tag %d at byte %zu", tag,
               (size_t)(p - start));
  }
  return -1;
}

void hd_msg_info_of(const char *p, size_t len, hd_msg_info *info) {
  const unsigned char *u = (const unsigned char *)p, *end = u + len;
  info->count = 0;
  info->first_is_string = 0;
  if (cx_uv_read(&u, end, &info->count) != 0) return;
  info->first_is_string = info->count > 0 && u < end && *u == CX_T_STR;
}
