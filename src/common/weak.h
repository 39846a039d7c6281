/* weak.h: a weak table kept in the Lua registry, under a private key. */
#ifndef HD_WEAK_H
#define HD_WEAK_H

#include <lua.h>

/* Stores a new, empty table with mode `mode` ("k", "v") in the registry
 * under the light userdata `key`. Stack balanced. */
static inline void hd_weak_registry(lua_State *L, void *key, const char *mode) {
  lua_pushlightuserdata(L, key);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushstring(L, mode);
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

#endif
