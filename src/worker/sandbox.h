/* sandbox.h: the sandbox profile of a worker. */
#ifndef HD_SANDBOX_H
#define HD_SANDBOX_H

#include <lua.h>

/* Strips the state to what untrusted code may use: no FFI, no C modules,
 * no bytecode, no io or os escape hatches, no debug library but traceback. */
void hd_sandbox_lua(lua_State *L);

/* Tight resource limits, no new privileges, and a seccomp filter that kills
 * the process on a forbidden system call. Irreversible. Returns 0 or -1. */
int hd_sandbox_process(void);

#endif
