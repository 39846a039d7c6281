/* sandbox.h: the sandbox profile of a worker. */
#ifndef HD_SANDBOX_H
#define HD_SANDBOX_H

#include <lua.h>
#include <stdio.h>

/* Strips the state to what untrusted code may use: no FFI, no C modules,
 * no bytecode, no io or os escape hatches, no debug library but traceback. */
void hd_sandbox_lua(lua_State *L);

/* Tight resource limits, no new privileges, no capabilities, and a seccomp
 * filter that allows only the system calls a job and the worker need and
 * kills the process on any other. Irreversible. Returns 0 or -1. */
int hd_sandbox_process(void);

/* Writes the names of the system calls the filter allows on this
 * architecture, some with their arguments checked, one per line. */
void hd_sandbox_allowlist(FILE *out);

#endif
