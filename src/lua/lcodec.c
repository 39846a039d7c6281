/* lcodec.c: the codec as Lua functions, for tests and tools. */
#include "lcodec.h"

#include <lauxlib.h>
#include <lua.h>

#include "codec.h"

#define HD_LCODEC_BUF "handler.codec.buf"

/* Frees the encode buffer. It may run twice (an explicit free after a
 * successful encode, then the collector), so it leaves the buffer empty. */
static int hd_lcodec_buf_gc(lua_State *L) {
  hd_buf *b = lua_touserdata(L, 1);
  if (b != NULL) hd_buf_free(b);
  return 0;
}

/* Encodes the n values from index 1 with `flags`, pushing the message. */
static int hd_lcodec_encode(lua_State *L, int flags) {
  int n = lua_gettop(L);
  hd_buf *b;
  /* hd_encode raises on a value that cannot travel: the buffer lives in a
   * userdata, made and given its __gc before anything is allocated, so an
   * error leaves it to the collector instead of leaking it. */
  b = lua_newuserdata(L, sizeof *b);
  b->data = NULL;
  b->len = b->cap = 0;
  if (luaL_newmetatable(L, HD_LCODEC_BUF)) {
    lua_pushcfunction(L, hd_lcodec_buf_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  hd_encode(L, 1, n, b, flags);
  lua_pushlstring(L, b->data != NULL ? b->data : "", b->len);
  hd_buf_free(b);
  return 1;
}

int hd_l_encode(lua_State *L) {
  return hd_lcodec_encode(L, HD_ENC_FUNCTIONS);
}

int hd_l_encode_job(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  return hd_lcodec_encode(L, HD_ENC_FUNCTIONS | HD_ENC_HOST | HD_ENC_ARGS);
}

int hd_l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int flags = (lua_toboolean(L, 2) ? HD_DEC_TRUSTED : 0) | (lua_toboolean(L, 3) ? HD_DEC_NOGC : 0);
  /* The string stays on the stack below the decoded values, so s stays
   * valid throughout. */
  return hd_decode(L, s, len, flags);
}

int hd_l_validate(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  char err[HD_VALIDATE_ERRLEN];
  if (hd_validate(s, len, err, sizeof err) == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_pushstring(L, err);
  return 2;
}

int hd_l_refuse(lua_State *L) {
  int t = lua_type(L, 1);
  luaL_argcheck(L, t == LUA_TTABLE || t == LUA_TFUNCTION || t == LUA_TUSERDATA, 1,
                "table, function or userdata expected");
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TSTRING);
  lua_settop(L, 2);
  hd_refuse(L, 1, 2);
  return 0;
}
