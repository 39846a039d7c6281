rockspec_format = "3.0"
package = "handler"
version = "scm-1"
source = {
  url = "git+https://example.invalid/handler.git",
}
description = {
  summary = "Run dangerous Lua closures in worker processes, with time and memory limits",
  detailed = [[
handler runs a Lua closure in a separate worker process, in a fresh lua_State
with a counted heap and a wall-clock limit, and returns like pcall. A closure
that loops forever, eats memory, raises, calls os.exit or segfaults through
the FFI comes back as an error value; the caller never blocks, crashes or
leaks because of it. Pools put shared budgets over many jobs.
]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.1, < 5.2",
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
  },
}
