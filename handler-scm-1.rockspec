-- handler's rockspec: the development version, built from the default branch.
--
-- Releases are git tags vX.Y.Z. The rockspec of release X.Y.Z is a copy of
-- this one named handler-X.Y.Z-1.rockspec, with
--   version = "X.Y.Z-1"
--   source = { url = "git+https://github.com/handler-lua/handler.git", tag = "vX.Y.Z" }
-- (the -1 counts revisions of the rockspec itself for the same tag).
--
-- handler runs only in LuaJIT 2.1. The build (CMakeLists.txt) stops with a
-- message when luarocks is set up for PUC Lua 5.1 or when LuaJIT 2.1's
-- headers are missing.
rockspec_format = "3.0"
package = "handler"
version = "scm-1"
source = {
  url = "git+https://github.com/handler-lua/handler.git",
}
description = {
  summary = "Run dangerous Lua closures in worker processes, with time and memory limits",
  detailed = [[
handler runs a Lua closure in a separate worker process, in a fresh lua_State
with a counted heap and a wall-clock limit, and returns like pcall. A closure
that loops forever, eats memory, raises, calls os.exit or segfaults through
the FFI comes back as an error value; the caller never blocks, crashes or
leaks because of it. Pools put shared budgets over many jobs. LuaJIT 2.1 on
Linux only.
]],
  homepage = "https://github.com/handler-lua/handler",
  license = "MIT",
  labels = { "luajit", "sandbox", "process", "isolation" },
}
supported_platforms = { "linux" }
dependencies = {
  "lua >= 5.1, < 5.2",
}
-- Found by luarocks, which passes their directories to CMake (give
-- LUAJIT_DIR=..., LIBUV_DIR=..., SECCOMP_DIR=... to luarocks to choose).
-- Debian: libluajit2-5.1-dev (or libluajit-5.1-dev), libuv1-dev,
-- libseccomp-dev.
external_dependencies = {
  LUAJIT = { header = "luajit-2.1/luajit.h", library = "luajit-5.1" },
  LIBUV = { header = "uv.h", library = "uv" },
  SECCOMP = { header = "seccomp.h", library = "seccomp" },
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_C_FLAGS = "$(CFLAGS)",
    CMAKE_MODULE_LINKER_FLAGS = "$(LIBFLAG)",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    HANDLER_LUA = "$(LUA)",
    HANDLER_LUAJIT_INCDIR = "$(LUAJIT_INCDIR)",
    HANDLER_LUAJIT_LIBDIR = "$(LUAJIT_LIBDIR)",
    HANDLER_LIBUV_INCDIR = "$(LIBUV_INCDIR)",
    HANDLER_LIBUV_LIBDIR = "$(LIBUV_LIBDIR)",
    HANDLER_SECCOMP_INCDIR = "$(SECCOMP_INCDIR)",
    HANDLER_SECCOMP_LIBDIR = "$(SECCOMP_LIBDIR)",
  },
  -- The command line: `handler map ...`, and `handler serve ...`, which with
  -- handler.remote needs lua-redis (Debian: lua-redis; the rock redis-lua):
  -- not a dependency, as the rest of handler runs without it.
  install = {
    bin = { handler = "bin/handler" },
  },
}
