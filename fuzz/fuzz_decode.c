/* fuzz_decode.c: libFuzzer harness over the parent-side decoder, the code
 * that turns a worker's reply message into Lua values.
 *
 * Every input is decoded as hostile bytes (flags 0: no bytecode, no
 * require), in protected mode, on one lua_State reused across inputs, the
 * way lhandler.c decodes a reply (l_decode_reply under lua_pcall).
 * Besides the sanitizers' checks, the harness asserts:
 *   - a refused message raises a string starting "handler: bad message: "
 *     (or "handler: out of memory"), never another Lua error, which would
 *     mean a check was missed and the VM caught the problem instead;
 *   - the stack holds exactly the values decode said it pushed;
 *   - what was accepted is data that travels again: it re-encodes, the
 *     encoding decodes to the same number of values, and those are equal
 *     to the first ones, structure for structure (cycles, shared tables,
 *     metatables, NaN and -0.0 included);
 *   - where codec.h has hd_validate (the check of a reply without a
 *     lua_State), it agrees with hd_decode as codec.h promises: what it
 *     accepts decodes unless a name is missing from package.loaded; what it
 *     refuses and hd_decode accepts holds a named value it is stricter
 *     about; when both refuse, they say the same thing;
 *   - size hints cost what their message is worth (codec_int.h,
 *     CX_HINT_BYTES_PER_BYTE), never what they claim: decoding the input
 *     takes (peak bytes, counted by the state's allocator, the collector
 *     stopped) at most FZ_AMP_PER_BYTE bytes per input byte more than
 *     decoding the same input with every hint made 0.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "codec_walk.h"

/* Compares two lists of decoded values, a[1..n] and b[1..n] (tables, as a
 * message may hold up to 8000 values and a C frame's stack not twice that). Data tables
 * are compared as graphs (a table of the first list maps to exactly one of
 * the second); named values (modules and their fields) must be the same
 * object. Only raw access: the values came from hostile bytes and may carry
 * metatables with any metamethod. */
static const char fz_same_src[] =
    "local type, next, rawget, rawequal, getmt = type, next, rawget, rawequal, "
    "debug.getmetatable\n"
    "local same\n"
    "local function same_table(a, b, map)\n"
    "  if rawequal(a, b) then return true end\n"
    "  local m = map[a]\n"
    "  if m ~= nil then return rawequal(m, b) end\n"
    "  map[a] = b\n"
    "  local na, nb, ta, tb = 0, 0, 0, 0\n"
    "  for k, v in next, a do\n"
    "    na = na + 1\n"
    "    if type(k) == 'table' then ta = ta + 1\n"
    "    elseif not same(v, rawget(b, k), map) then return false, k end\n"
    "  end\n"
    "  for k in next, b do\n"
    "    nb = nb + 1\n"
    "    if type(k) == 'table' then tb = tb + 1 end\n"
    "  end\n"
    "  if na ~= nb or ta ~= tb then return false, 'key count' end\n"
    "  local ma, mb = getmt(a), getmt(b)\n"
    "  if (ma == nil) ~= (mb == nil) then return false, 'metatable' end\n"
    "  if ma ~= nil then return same(ma, mb, map) end\n"
    "  return true\n"
    "end\n"
    "same = function(a, b, map)\n"
    "  local t = type(a)\n"
    "  if t ~= type(b) then return false end\n"
    "  if t == 'number' then\n"
    "    if a ~= a then return b ~= b end\n"
    "    if a == 0 and b == 0 then return 1 / a == 1 / b end\n"
    "    return a == b\n"
    "  end\n"
    "  if t == 'table' then return same_table(a, b, map) end\n"
    "  return rawequal(a, b)\n"
    "end\n"
    "return function(n, a, b)\n"
    "  local map = {}\n"
    "  for i = 1, n do\n"
    "    local ok, where = same(rawget(a, i), rawget(b, i), map)\n"
    "    if not ok then\n"
    "      local t = type(where)\n"
    "      return false, i, (t == 'string' or t == 'number') and tostring(where) or t\n"
    "    end\n"
    "  end\n"
    "  return true\n"
    "end\n";

/* The memory bound (see the top): what hints may preallocate per byte
 * (CX_HINT_BYTES_PER_BYTE), and FZ_AMP_SLACK for the decoder's own slots
 * and the strings of error messages. */
#define FZ_AMP_PER_BYTE 4
#define FZ_AMP_SLACK 8192

/* The state's allocator is LuaJIT's own, wrapped to count the bytes it
 * holds, and their peak while fz_counting is set. (LuaJIT's allocator
 * takes its memory with mmap, out of LeakSanitizer's sight: the objects a
 * state keeps across inputs, reachable only through its tagged pointers,
 * are not reported as leaks.) */
static lua_Alloc fz_lj_alloc;
static void *fz_lj_ud;
static size_t fz_live, fz_peak;
static int fz_counting;

static void *fz_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  void *q;
  size_t old = p != NULL ? osize : 0;
  (void)ud;
  q = fz_lj_alloc(fz_lj_ud, p, osize, nsize);
  if (nsize == 0) {
    fz_live -= old;
    return q;
  }
  if (q == NULL) return NULL;
  fz_live = fz_live - old + nsize;
  if (fz_counting && fz_live > fz_peak) fz_peak = fz_live;
  return q;
}

typedef struct fz_input {
  const char *p;
  size_t len;
} fz_input;

static lua_State *fz_L;
static int fz_same_ref;
static hd_buf fz_out; /* reused; reachable, so never a leak */

/* Raised by the round trip when the Lua stack, not the codec, is the limit. */
#define FZ_NOSTACK "fuzz_decode: no stack"

static int fz_starts(const char *s, const char *prefix) {
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

_Noreturn static void fz_fail(const char *what, const char *detail) {
  fprintf(stderr, "fuzz_decode: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  abort();
}

/* Packs the n values at 1..n into a table, which replaces them. */
static void fz_pack(lua_State *L, int n) {
  int i;
  lua_createtable(L, n, 0);
  for (i = 1; i <= n; i++) {
    lua_pushvalue(L, i);
    lua_rawseti(L, -2, i);
  }
  lua_replace(L, 1);
  lua_settop(L, 1);
}

/* Runs in protected mode, like lhandler.c's l_decode_reply.
 * L: input(lightuserdata) → decoded values */
static int fz_decode(lua_State *L) {
  fz_input *in = lua_touserdata(L, 1);
  int n;
  lua_settop(L, 0);
  n = hd_decode(L, in->p, in->len, 0);
  if (n < 0 || lua_gettop(L) != n)
    fz_fail("decode pushed another number of values than it returned", NULL);
  return n;
}

/* Phase two, for accepted input: re-encode the values and decode the
 * encoding. Runs in its own protected call so that an error here is told
 * apart from a refusal of the input. L: a(table) n → b(table) */
static int fz_roundtrip(lua_State *L) {
  int n = (int)lua_tointeger(L, 2), m, i;
  lua_settop(L, 1);
  if (!lua_checkstack(L, n + 8)) {
    lua_pushliteral(L, FZ_NOSTACK);
    return lua_error(L);
  }
  for (i = 1; i <= n; i++) lua_rawgeti(L, 1, i);
  fz_out.len = 0;
  hd_encode(L, 2, n, &fz_out, 0);
  if (lua_gettop(L) != n + 1) fz_fail("encode left the stack unbalanced", NULL);
  lua_settop(L, 0);
  m = hd_decode(L, fz_out.data ? fz_out.data : "", fz_out.len, 0);
  if (m != n) fz_fail("the re-encoded message decodes to another number of values", NULL);
  if (lua_gettop(L) != n) fz_fail("the second decode left the stack unbalanced", NULL);
  if (n == 0) {
    lua_newtable(L);
    return 1;
  }
  fz_pack(L, n);
  return 1;
}

/* Whether a decode error is one hd_validate cannot foresee: names it cannot
 * look up (missing, or naming a value of the wrong type, such as a function
 * for a metatable), and the Lua stack or memory it does not use. */
static int fz_beyond_validate(const char *e) {
  return strstr(e, "package.loaded") != NULL || strstr(e, "module is not a table") != NULL ||
         strstr(e, "metatable is not a table") != NULL || strstr(e, "for the Lua stack") != NULL ||
         strstr(e, "out of memory") != NULL;
}

/* hd_validate against hd_decode's verdict: derr is NULL when decode
 * accepted the input, else its message. */
static void fz_check_validate(const uint8_t *data, size_t size, const char *derr) {
#ifdef HD_VALIDATE_ERRLEN
  char verr[HD_VALIDATE_ERRLEN];
  int vrc;
  verr[0] = '\0';
  vrc = hd_validate((const char *)data, size, verr, sizeof verr);
  if (vrc == 0) {
    if (derr != NULL && !fz_beyond_validate(derr))
      fz_fail("hd_validate accepted what hd_decode refuses", derr);
    return;
  }
  if (!fz_starts(verr, "handler: bad message: ") && !fz_starts(verr, "handler: out of memory"))
    fz_fail("hd_validate refused with an odd message", verr);
  if (derr == NULL) {
    if (strstr(verr, "named value") == NULL)
      fz_fail("hd_validate refused what hd_decode accepts", verr);
    return;
  }
  if (strcmp(verr, derr) != 0 && strstr(verr, "named value") == NULL && !fz_beyond_validate(derr)) {
    fprintf(stderr, "fuzz_decode: hd_decode: %s\n", derr);
    fz_fail("hd_validate and hd_decode refuse with different messages", verr);
  }
#else
  (void)data;
  (void)size;
  (void)derr;
#endif
}

/* Peak bytes hd_decode(p, len, 0) allocates on an empty stack after a full
 * collection, the collector stopped meanwhile; SIZE_MAX when it refuses
 * the message (which cannot happen for the honest encoding of values it
 * accepted, or for the input it accepted a moment ago). */
static size_t fz_decode_peak(lua_State *L, const char *p, size_t len) {
  fz_input in;
  size_t base;
  int rc;
  in.p = p;
  in.len = len;
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT, 0);
  lua_gc(L, LUA_GCSTOP, 0);
  lua_pushcfunction(L, fz_decode);
  lua_pushlightuserdata(L, &in);
  base = fz_peak = fz_live;
  fz_counting = 1;
  rc = lua_pcall(L, 1, LUA_MULTRET, 0);
  fz_counting = 0;
  lua_settop(L, 0);
  lua_gc(L, LUA_GCRESTART, 0);
  return rc != 0 ? SIZE_MAX : fz_peak - base;
}

/* Writes over bytes [from, to) of c a varint of the same length that says
 * 0 (0x80... 0x00, which the reader accepts). */
static void fz_zero_uv(unsigned char *c, size_t from, size_t to) {
  size_t k;
  for (k = from; k + 1 < to; k++) c[k] = 0x80;
  c[to - 1] = 0;
}

/* The walker's table hook: the hints' varints, in the copy, say 0. The
 * hash hint ends where the walk is; the array hint ends where it begins,
 * narr_left bytes before the end, and begins after the tag, the first byte
 * before it without the "more" bit. */
static void fz_zero_table(cx_walk *w, int at, int array, uint64_t narr, uint64_t nhash,
                          size_t narr_left) {
  unsigned char *copy = w->ud;
  size_t mid = (size_t)(w->end - w->start) - narr_left, hend = (size_t)(w->p - w->start), i;
  (void)at;
  (void)array;
  (void)narr;
  (void)nhash;
  fz_zero_uv(copy, mid, hend);
  i = mid - 1;
  while (w->start[i - 1] & CX_UV_MORE) i--;
  fz_zero_uv(copy, i, mid);
}

static const cx_ops fz_zero_ops = {.table = fz_zero_table};

/* The memory check (see the top), for an input decode accepted. */
static void fz_check_memory(lua_State *L, const uint8_t *data, size_t size) {
  size_t zeroed, hinted;
  unsigned char *copy;
  cx_walk w;
  char why[160];
  copy = malloc(size);
  if (copy == NULL) return;
  memcpy(copy, data, size);
  cx_walk_init(&w, data, size, 0, copy);
  if (cx_walk_run(&w, &fz_zero_ops) != CX_WALK_OK) {
    free(copy);
    return;
  }
  zeroed = fz_decode_peak(L, (const char *)copy, size);
  free(copy);
  hinted = fz_decode_peak(L, (const char *)data, size);
  if (zeroed == SIZE_MAX || hinted == SIZE_MAX) return; /* out of memory */
  if (hinted > zeroed + FZ_AMP_PER_BYTE * size + FZ_AMP_SLACK) {
    snprintf(why, sizeof why, "%zu bytes for %zu input bytes; %zu with every hint 0", hinted,
             size, zeroed);
    fz_fail("size hints allocate out of proportion to the input", why);
  }
}

static void fz_init(void) {
  fz_L = luaL_newstate();
  if (fz_L == NULL) fz_fail("cannot create a lua_State", NULL);
  /* Counted from what the state holds now (frees of those blocks come). */
  fz_live = (size_t)lua_gc(fz_L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(fz_L, LUA_GCCOUNTB, 0);
  fz_lj_alloc = lua_getallocf(fz_L, &fz_lj_ud);
  lua_setallocf(fz_L, fz_alloc, NULL);
  luaL_openlibs(fz_L);
  if (luaL_loadstring(fz_L, fz_same_src) != 0 || lua_pcall(fz_L, 0, 1, 0) != 0)
    fz_fail("cannot load the comparison function", lua_tostring(fz_L, -1));
  fz_same_ref = luaL_ref(fz_L, LUA_REGISTRYINDEX);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static unsigned iter;
  lua_State *L;
  fz_input in;
  const char *e;
  int n;
  if (fz_L == NULL) fz_init();
  L = fz_L;
  in.p = (const char *)data;
  in.len = size;
  lua_settop(L, 0);
  lua_pushcfunction(L, fz_decode);
  lua_pushlightuserdata(L, &in);
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != 0) {
    e = lua_tostring(L, -1);
    if (e == NULL) fz_fail("decode raised a non-string", NULL);
    if (!fz_starts(e, "handler: bad message: ") && !fz_starts(e, "handler: out of memory"))
      fz_fail("decode raised an unexpected error", e);
    fz_check_validate(data, size, e);
    goto done;
  }
  fz_check_validate(data, size, NULL);
  n = lua_gettop(L);
  if (n == 0) goto done;
  fz_pack(L, n); /* L: a */
  lua_pushcfunction(L, fz_roundtrip);
  lua_pushvalue(L, 1);
  lua_pushinteger(L, n);
  if (lua_pcall(L, 2, 1, 0) != 0) {
    e = lua_tostring(L, -1);
    /* Data the decoder accepted must travel again; running out of memory
     * or of Lua stack are the only excuses, and depth: the decoder bounds
     * the nesting of the message, the encoder the depth of its own walk,
     * which follows the tables in hash order. Tables the message has side
     * by side, linked by references (a chain of metatables, say), can be a
     * walk deeper than any nesting the message had, and the encoder then
     * refuses them, with its clear error. */
    if (e == NULL || (!fz_starts(e, "handler: out of memory") && strcmp(e, FZ_NOSTACK) != 0 &&
                      strstr(e, " nested deeper than ") == NULL))
      fz_fail("accepted values do not re-encode", e ? e : "(non-string error)");
    goto done;
  }
  /* L: a b */
  lua_rawgeti(L, LUA_REGISTRYINDEX, fz_same_ref);
  lua_pushinteger(L, n);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  if (lua_pcall(L, 3, 3, 0) != 0) {
    e = lua_tostring(L, -1);
    if (e == NULL || !strstr(e, "not enough memory")) fz_fail("the comparison failed to run", e);
    goto done;
  }
  if (!lua_toboolean(L, -3)) {
    char why[160];
    snprintf(why, sizeof why, "value %d differs (at key %s)", (int)lua_tointeger(L, -2),
             lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
    fz_fail("the round trip changed a value", why);
  }
  fz_check_memory(L, data, size);
done:
  lua_settop(L, 0);
  if ((++iter & 1023) == 0) lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
