-- spec/support/nginx.lua: a real nginx with the Lua module, started by a spec
-- and always stopped by it. How a spec uses it:
--
--   local nginx = require("spec.support.nginx")
--   it("...", function()
--     local srv = nginx.start{ workers = 2, server = [[
--       location = /x { content_by_lua_block { ngx.say(require("handler").run(...)) } }
--     ]] }
--     finally(function() srv:stop() end)   -- runs whether the test passed or not
--     local status, body = http.get(srv.port, "/x")
--   end)
--
-- busted keeps one `finally` per test (a second replaces the first): a test
-- with two servers stops both in one. A server kept for a whole describe
-- block is started in lazy_setup and stopped in lazy_teardown. nginx.stop_all()
-- stops every server still running (an after_each or teardown of last resort);
-- stop() is always safe to call, again and after quit().
--
-- start{} options (all optional):
--   workers      worker_processes (default 1)
--   main         extra configuration in the main context (`env`, ...)
--   http         extra configuration in the http block
--   server       the server block's configuration (its locations)
--   init         Lua code for init_by_lua (run by the master, before the fork)
--   init_worker  Lua code for init_worker_by_lua (run by each worker)
--   shared_dicts { name = "1m", ... }: lua_shared_dict directives
--   listen       parameters added to the listen directive ("reuseport")
-- The Lua code goes through files (init_by_lua_file), so it needs no quoting.
-- The server listens on 127.0.0.1 at a free port, in a private prefix
-- directory under /tmp that holds the configuration, the pid file, the
-- error log, the temp paths, and a copy of the module (below). Every server
-- also has `location = /_harness/pid`, answering with the serving worker's pid.
--
-- The server: srv.port, srv.prefix, srv.pid (the master), srv.exit (once it
-- exited: "exit N" or "signal N"); srv:url(path), srv:get(path) (status,
-- body, headers), srv:workers() (the current workers' pids), srv:descendants()
-- (every process below the master: workers, handler's supervisors and
-- workers under them), srv:error_log() (its text), srv:reload() (SIGHUP;
-- returns once the old workers are gone and new ones serve), srv:quit()
-- (SIGQUIT; returns once the master exited), srv:stop(). reload and quit
-- fail the test, with the error log, when nginx does not get there in time.
-- The module's functions over /proc (descendants_of, identify, living,
-- cmdline, uid_of, pids_with_cmdline) follow processes by pid and start time.
--
-- What runs: `nginx -p PREFIX -c PREFIX/nginx.conf` with `daemon off` and
-- `master_process on`, started with posix_spawn, so the master is this
-- process's own child: its pid is known at once, it is reaped here with
-- waitpid (no zombie outlives stop()), and no fork handler of the handler
-- core loaded in this process runs (posix_spawn does not run them). Through
-- `setpriv --pdeathsig TERM` when setpriv is there: a spec process that dies
-- takes its nginx down with it.
--
-- The module nginx loads: lua/handler/ and the build's handler/ directory
-- (HANDLER_TEST_BUILD, as the other specs use; else where package.cpath
-- finds handler.core) are copied into the prefix, readable by all. When the
-- spec runs as root the workers run as nobody (`user nobody nogroup`), and a
-- checkout need not be readable by nobody: a clone made in a `mktemp -d`
-- directory is not. The copy makes the harness independent of that. The
-- server's lua_package_path and lua_package_cpath name the copy first, then
-- lua-resty-core's directory, then the defaults (nginx.lua_paths).
--
-- HANDLER_NGINX_KEEP=1 keeps prefix directories after stop() (to read
-- their logs); HANDLER_NGINX (the executable) and HANDLER_NGINX_MODULES (the
-- directory of ndk_http_module.so and ngx_http_lua_module.so) override the
-- Debian paths.
local ffi = require("ffi")
local H = require("spec.support.helpers")
local http = require("spec.support.http")

local format, concat = string.format, table.concat
local tonumber, tostring, ipairs, pairs, select, error, setmetatable, pcall =
  tonumber, tostring, ipairs, pairs, select, error, setmetatable, pcall
local getenv, newproxy, getmetatable = os.getenv, newproxy, getmetatable
local q = H.shell_quote

-- Declarations under names of our own (asm labels), as in helpers.lua.
local function cdef(s)
  pcall(ffi.cdef, s)
end
cdef [[typedef struct { uint64_t opaque[64]; } hd_ngx_spawn_actions;]]
cdef [[typedef struct { uint64_t opaque[64]; } hd_ngx_spawn_attr;]]
cdef [[typedef struct { unsigned long val[16]; } hd_ngx_sigset;]]
cdef [[int hd_ngx_spawn(int *pid, const char *path, const hd_ngx_spawn_actions *fa,
  const hd_ngx_spawn_attr *attr, char *const argv[], char *const envp[]) __asm__("posix_spawn");]]
cdef [[int hd_ngx_fa_init(hd_ngx_spawn_actions *fa) __asm__("posix_spawn_file_actions_init");]]
cdef [[int hd_ngx_fa_destroy(hd_ngx_spawn_actions *fa) __asm__("posix_spawn_file_actions_destroy");]]
cdef [[int hd_ngx_fa_addopen(hd_ngx_spawn_actions *fa, int fd, const char *path, int flags,
  unsigned int mode) __asm__("posix_spawn_file_actions_addopen");]]
cdef [[int hd_ngx_fa_adddup2(hd_ngx_spawn_actions *fa, int fd, int to)
  __asm__("posix_spawn_file_actions_adddup2");]]
cdef [[int hd_ngx_fa_closefrom(hd_ngx_spawn_actions *fa, int from)
  __asm__("posix_spawn_file_actions_addclosefrom_np");]]
cdef [[int hd_ngx_attr_init(hd_ngx_spawn_attr *a) __asm__("posix_spawnattr_init");]]
cdef [[int hd_ngx_attr_destroy(hd_ngx_spawn_attr *a) __asm__("posix_spawnattr_destroy");]]
cdef [[int hd_ngx_attr_setflags(hd_ngx_spawn_attr *a, short flags) __asm__("posix_spawnattr_setflags");]]
cdef [[int hd_ngx_attr_setsigmask(hd_ngx_spawn_attr *a, const hd_ngx_sigset *s)
  __asm__("posix_spawnattr_setsigmask");]]
cdef [[int hd_ngx_attr_setsigdefault(hd_ngx_spawn_attr *a, const hd_ngx_sigset *s)
  __asm__("posix_spawnattr_setsigdefault");]]
cdef [[int hd_ngx_sigemptyset(hd_ngx_sigset *s) __asm__("sigemptyset");]]
cdef [[int hd_ngx_sigfillset(hd_ngx_sigset *s) __asm__("sigfillset");]]
cdef [[int hd_ngx_sigdelset(hd_ngx_sigset *s, int sig) __asm__("sigdelset");]]
cdef [[int hd_ngx_waitpid(int pid, int *status, int options) __asm__("waitpid");]]
cdef [[int hd_ngx_kill(int pid, int sig) __asm__("kill");]]
cdef [[unsigned int hd_ngx_geteuid(void) __asm__("geteuid");]]
cdef [[char *hd_ngx_strerror(int e) __asm__("strerror");]]
cdef [[char **hd_ngx_environ __asm__("environ");]]

local C = ffi.C
local O_RDONLY, O_WRONLY, O_CREAT, O_APPEND = 0, 1, 0x40, 0x400
local POSIX_SPAWN_SETSIGDEF, POSIX_SPAWN_SETSIGMASK = 0x04, 0x08
local WNOHANG = 1
local SIGHUP, SIGQUIT, SIGKILL, SIGTERM, SIGSTOP = 1, 3, 9, 15, 19

local M = {}

--- How long start waits for nginx to serve, reload for the new workers,
-- quit and stop for the master's exit: generous, for a loaded CI machine.
M.START_S, M.RELOAD_S, M.QUIT_S, M.STOP_S = 15, 20, 20, 10

M.MODULES_DIR = getenv("HANDLER_NGINX_MODULES") or "/usr/lib/nginx/modules"
--- Where lua-resty-core is (the Lua module refuses to start without it).
M.RESTY_DIR = "/usr/share/lua/5.1"

local function sh_ok(cmd)
  local r = os.execute(cmd)
  return r == 0 or r == true
end

--- The first of the paths given (nil ones skipped) that is executable.
local function first_executable(...)
  for i = 1, select("#", ...) do
    local p = select(i, ...)
    if p and sh_ok("test -x " .. q(p)) then return p end
  end
  return nil
end

local NGINX = first_executable(getenv("HANDLER_NGINX"), "/usr/sbin/nginx", "/usr/local/sbin/nginx")
local SETPRIV = first_executable("/usr/bin/setpriv", "/bin/setpriv")

--- true when nginx with the Lua module can be started; else false and why.
function M.available()
  if NGINX == nil then return false, "nginx is not installed (Debian: nginx)" end
  for _, m in ipairs({ "ndk_http_module.so", "ngx_http_lua_module.so" }) do
    if not H.exists(M.MODULES_DIR .. "/" .. m) then
      return false, "no " .. M.MODULES_DIR .. "/" .. m .. " (Debian: libnginx-mod-http-lua)"
    end
  end
  if not H.exists(M.RESTY_DIR .. "/resty/core.lua") then
    return false, "no " .. M.RESTY_DIR .. "/resty/core.lua (Debian: lua-resty-core)"
  end
  return true
end

--- Whether this process is root, so nginx's workers run as nobody.
function M.as_root()
  return C.hd_ngx_geteuid() == 0
end

--- The directory holding handler/init.lua, as this process found it.
function M.lua_dir()
  local init = package.searchpath("handler", package.path)
  return init and (init:gsub("/handler/init%.lua$", ""))
end

--- The build directory: HANDLER_TEST_BUILD, else where handler.core is found.
function M.build_dir()
  local b = getenv("HANDLER_TEST_BUILD")
  if b and b ~= "" then return b end
  local core = package.searchpath("handler.core", package.cpath)
  return core and (core:gsub("/handler/core%.so$", ""))
end

--- The http-block directives that let nginx's Lua find handler: its Lua
-- files under lua_dir (lua_dir/handler/init.lua), its C module and worker
-- under lib_dir (lib_dir/handler/core.so), lua-resty-core, then the
-- defaults (";;").
function M.lua_paths(lua_dir, lib_dir)
  return format('lua_package_path "%s/?.lua;%s/?/init.lua;%s/?.lua;%s/?/init.lua;;";\n'
    .. 'lua_package_cpath "%s/?.so;;";\n', lua_dir, lua_dir, M.RESTY_DIR, M.RESTY_DIR, lib_dir)
end

---------------------------------------------------------------------------
-- Processes, from /proc.

--- state, ppid, start time (in clock ticks since boot) of pid, or nil.
local function stat(pid)
  local s = H.read_file("/proc/" .. tostring(pid) .. "/stat")
  if s == nil then return nil end
  -- After the command name (which may hold spaces and parentheses): state,
  -- ppid, then 17 more fields to the start time.
  local rest = s:match("^.*%) (.*)$")
  if rest == nil then return nil end
  local f = {}
  for w in rest:gmatch("%S+") do f[#f + 1] = w end
  return f[1], tonumber(f[2]), tonumber(f[20])
end

--- The command line of pid, its arguments separated by spaces ("" when gone).
function M.cmdline(pid)
  local s = H.read_file("/proc/" .. tostring(pid) .. "/cmdline") or ""
  return (s:gsub("%z+$", ""):gsub("%z", " "))
end

--- The real uid of pid, or nil when it is gone.
function M.uid_of(pid)
  local s = H.read_file("/proc/" .. tostring(pid) .. "/status")
  return s and tonumber(s:match("\nUid:%s*(%d+)"))
end

--- The pids of all processes whose chain of parents leads to `root` (not
-- root itself), at this moment. A process whose parent exited has been
-- given to another (init or a subreaper) and is no longer found here: to
-- follow processes through an exit, identify() them before.
function M.descendants_of(root)
  local parent = {}
  for _, pid in ipairs(H.all_pids()) do
    local _, ppid = stat(pid)
    if ppid then parent[pid] = ppid end
  end
  local out = {}
  for pid in pairs(parent) do
    local p, depth = parent[pid], 0
    while p and p > 1 and p ~= root and depth < 256 do
      p, depth = parent[p], depth + 1
    end
    if p == root then out[#out + 1] = pid end
  end
  table.sort(out)
  return out
end

--- { { pid =, start =, cmd = }, ... } of pids: each process as it is now,
-- so that living() does not mistake a later process with a reused pid for it.
function M.identify(pids)
  local out = {}
  for _, pid in ipairs(pids) do
    local state, _, start = stat(pid)
    if state then out[#out + 1] = { pid = pid, start = start, cmd = M.cmdline(pid) } end
  end
  return out
end

--- Those of `ids` (from identify) that are still running: not exited and
-- not a zombie (an orphan's zombie is init's to reap, not ours).
function M.living(ids)
  local out = {}
  for _, id in ipairs(ids) do
    local state, _, start = stat(id.pid)
    if state and state ~= "Z" and state ~= "X" and start == id.start then out[#out + 1] = id end
  end
  return out
end

--- "pid (command line), ..." of ids, for messages.
function M.describe(ids)
  local s = {}
  for i, id in ipairs(ids) do s[i] = format("%d (%s)", id.pid, id.cmd) end
  return "{" .. concat(s, ", ") .. "}"
end

--- The pids of all processes whose command line starts with `prefix`.
function M.pids_with_cmdline(prefix)
  local out = {}
  for _, pid in ipairs(H.all_pids()) do
    if M.cmdline(pid):sub(1, #prefix) == prefix then out[#out + 1] = pid end
  end
  return out
end

--- Polls pred() every 20 ms until it holds or `seconds` pass; whether it held.
local function wait_for(pred, seconds)
  local deadline = H.now() + seconds
  while true do
    if pred() then return true end
    if H.now() > deadline then return false end
    H.sleep_ms(20)
  end
end
M.wait_for = wait_for

---------------------------------------------------------------------------
-- Starting a process.

--- Starts argv[1] (a path) with argv and the environment env (a list of
-- "NAME=value"), stdin from /dev/null, stdout and stderr appended to
-- out_path, no other descriptor, signals unblocked and at their defaults.
-- Returns the pid.
local function spawn(argv, env, out_path)
  local fa, attr = ffi.new("hd_ngx_spawn_actions"), ffi.new("hd_ngx_spawn_attr")
  C.hd_ngx_fa_init(fa)
  C.hd_ngx_attr_init(attr)
  C.hd_ngx_fa_addopen(fa, 0, "/dev/null", O_RDONLY, 0)
  C.hd_ngx_fa_addopen(fa, 1, out_path, O_WRONLY + O_CREAT + O_APPEND, 420)
  C.hd_ngx_fa_adddup2(fa, 1, 2)
  -- glibc 2.34 and later; where it is missing the descriptors this process
  -- did not mark close-on-exec go to nginx too, which is harmless.
  pcall(function() C.hd_ngx_fa_closefrom(fa, 3) end)
  local none, all = ffi.new("hd_ngx_sigset"), ffi.new("hd_ngx_sigset")
  C.hd_ngx_sigemptyset(none)
  C.hd_ngx_sigfillset(all)
  C.hd_ngx_sigdelset(all, SIGKILL)
  C.hd_ngx_sigdelset(all, SIGSTOP)
  C.hd_ngx_attr_setsigmask(attr, none)
  C.hd_ngx_attr_setsigdefault(attr, all)
  C.hd_ngx_attr_setflags(attr, POSIX_SPAWN_SETSIGDEF + POSIX_SPAWN_SETSIGMASK)
  local cargv = ffi.new("char *[?]", #argv + 1)
  local cenv = ffi.new("char *[?]", #env + 1)
  local keep = {}
  for i, a in ipairs(argv) do
    keep[#keep + 1] = ffi.new("char[?]", #a + 1, a)
    cargv[i - 1] = keep[#keep]
  end
  for i, e in ipairs(env) do
    keep[#keep + 1] = ffi.new("char[?]", #e + 1, e)
    cenv[i - 1] = keep[#keep]
  end
  local pid = ffi.new("int[1]")
  local rc = C.hd_ngx_spawn(pid, argv[1], fa, attr, cargv, cenv)
  C.hd_ngx_fa_destroy(fa)
  C.hd_ngx_attr_destroy(attr)
  if rc ~= 0 then
    error("nginx harness: posix_spawn " .. argv[1] .. ": " .. ffi.string(C.hd_ngx_strerror(rc)), 3)
  end
  return pid[0]
end

--- This process's environment, without what would change how nginx's Lua
-- finds modules (the spec's own LUA_PATH and LUA_CPATH would come in
-- through ";;").
local function nginx_env()
  local out, env = {}, C.hd_ngx_environ
  local i = 0
  while env[i] ~= nil do
    local e = ffi.string(env[i])
    if not e:match("^LUA_C?PATH") and not e:match("^LUA_INIT") then out[#out + 1] = e end
    i = i + 1
  end
  return out
end

--- A free TCP port on 127.0.0.1 (bound to port 0 and closed: another
-- process may take it before nginx does, which start() retries).
local function free_port()
  local uv = require("luv")
  local s = uv.new_tcp()
  local ok, err = s:bind("127.0.0.1", 0)
  if not ok then
    s:close()
    error("nginx harness: cannot bind 127.0.0.1:0: " .. tostring(err), 3)
  end
  local port = s:getsockname().port
  s:close()
  uv.run("nowait")
  return port
end

---------------------------------------------------------------------------
-- The configuration.

-- The variables that configure the sanitizers of an ASan build.
local SANITIZER_ENV = { "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "LD_PRELOAD" }

-- A location of the harness's own: the pid of the worker that served it,
-- which tells start() nginx serves and reload() that the new workers do.
local PING = "/_harness/pid"

local function config(srv, opts)
  local p = srv.prefix
  local lines = {
    format("load_module %s/ndk_http_module.so;", M.MODULES_DIR),
    format("load_module %s/ngx_http_lua_module.so;", M.MODULES_DIR),
    "daemon off;",
    "master_process on;",
    format("worker_processes %d;", srv.n),
    format("pid %s/nginx.pid;", p),
    format("error_log %s/error.log notice;", p),
  }
  if M.as_root() then lines[#lines + 1] = "user nobody nogroup;" end
  -- nginx gives its workers only the variables `env` names (and TZ), and
  -- handler's supervisor, started by a worker, gets the worker's: the
  -- sanitizers' settings must be named to reach it (tools/test's ASan run).
  for _, name in ipairs(SANITIZER_ENV) do
    if getenv(name) then lines[#lines + 1] = format("env %s;", name) end
  end
  lines[#lines + 1] = opts.main or ""
  lines[#lines + 1] = "events { worker_connections 1024; }"
  lines[#lines + 1] = "http {"
  lines[#lines + 1] = "  access_log off;"
  for _, t in ipairs({ "client_body", "proxy", "fastcgi", "uwsgi", "scgi" }) do
    lines[#lines + 1] = format("  %s_temp_path %s/tmp/%s;", t, p, t)
  end
  lines[#lines + 1] = M.lua_paths(srv.lua_dir, srv.lib_dir)
  local dicts = {}
  for name in pairs(opts.shared_dicts or {}) do dicts[#dicts + 1] = name end
  table.sort(dicts)
  for _, name in ipairs(dicts) do
    lines[#lines + 1] = format("  lua_shared_dict %s %s;", name, tostring(opts.shared_dicts[name]))
  end
  if opts.init then
    H.write_file(p .. "/init.lua", opts.init)
    lines[#lines + 1] = format("  init_by_lua_file %s/init.lua;", p)
  end
  if opts.init_worker then
    H.write_file(p .. "/init_worker.lua", opts.init_worker)
    lines[#lines + 1] = format("  init_worker_by_lua_file %s/init_worker.lua;", p)
  end
  lines[#lines + 1] = opts.http or ""
  lines[#lines + 1] = "  server {"
  lines[#lines + 1] = format("    listen 127.0.0.1:%d%s;", srv.port,
    opts.listen and " " .. opts.listen or "")
  lines[#lines + 1] = format("    location = %s { content_by_lua_block { ngx.print(ngx.worker.pid()) } }", PING)
  lines[#lines + 1] = opts.server or ""
  lines[#lines + 1] = "  }"
  lines[#lines + 1] = "}"
  return concat(lines, "\n") .. "\n"
end

---------------------------------------------------------------------------
-- The server.

local Server = {}
Server.__index = Server

-- Servers started and not stopped yet, for stop_all.
local live = {}

--- The last `n` lines (40) of text.
local function tail(text, n)
  local lines = {}
  for line in (text or ""):gmatch("[^\n]*\n?") do
    if line ~= "" then lines[#lines + 1] = line end
  end
  return concat(lines, "", math.max(1, #lines - (n or 40) + 1))
end

function Server:url(path)
  return format("http://127.0.0.1:%d%s", self.port, path or "/")
end

--- The error log's text ("" before there is one).
function Server:error_log()
  return H.read_file(self.prefix .. "/error.log") or ""
end

--- What nginx wrote to its stdout and stderr.
function Server:output()
  return H.read_file(self.prefix .. "/output.log") or ""
end

--- Whether the master has exited; reaps it when it has. The exit is kept in
-- self.exit: "exit N" or "signal N".
function Server:exited()
  if self.exit then return true end
  local st = ffi.new("int[1]")
  local r = C.hd_ngx_waitpid(self.pid, st, WNOHANG)
  if r == 0 then return false end
  if r < 0 then
    self.exit = "gone" -- not ours to wait for any more (should not happen)
  elseif st[0] % 128 == 0 then
    self.exit = "exit " .. math.floor(st[0] / 256) % 256
  else
    self.exit = "signal " .. st[0] % 128
  end
  return true
end

--- The pids of the master's current worker processes ("nginx: worker
-- process", not the old ones of a reload that are shutting down).
function Server:workers()
  local out = {}
  if self:exited() then return out end
  for _, pid in ipairs(H.all_pids()) do
    local state, ppid = stat(pid)
    if ppid == self.pid and state ~= "Z" and M.cmdline(pid) == "nginx: worker process" then
      out[#out + 1] = pid
    end
  end
  table.sort(out)
  return out
end

--- All processes whose ancestry leads to the master: its workers (current
-- and shutting down), their children (handler's supervisors), theirs
-- (handler's workers), and so on.
function Server:descendants()
  if self:exited() then return {} end
  return M.descendants_of(self.pid)
end

--- Fails the test with `what`, the error log's end and nginx's output.
function Server:fail(what)
  error(format("%s\n-- %s/error.log (end):\n%s-- output:\n%s", what, self.prefix,
    tail(self:error_log()), tail(self:output(), 10)), 3)
end

--- One GET of path on this server: status, body, headers; or nil, why.
function Server:get(path, timeout_ms)
  return http.get(self.port, path, timeout_ms)
end

--- Stops the server, asserting it had nothing to kill by force.
function Server:stop_clean()
  local forced = self:stop()
  if #forced > 0 then error("stop() had to kill " .. M.describe(forced), 2) end
end

--- GETs path, asserting a 200 (with the error log in the message);
-- returns the body.
function Server:get_ok(path, timeout_ms)
  local status, body = http.get(self.port, path, timeout_ms or 10000)
  if status ~= 200 then
    error(format("GET %s: %s %s\n-- error log:\n%s", path, tostring(status), tostring(body),
      tail(self:error_log())), 2)
  end
  return body
end

--- Waits until every worker has a handler supervisor below it; fails the
-- test after 10 s.
function Server:wait_supervisors()
  local bare
  local ok = wait_for(function()
    bare = nil
    for _, w in ipairs(self:workers()) do
      local has = false
      for _, id in ipairs(M.identify(M.descendants_of(w))) do
        if id.cmd == "handler: supervisor" then has = true end
      end
      if not has then bare = w end
    end
    return bare == nil
  end, 10)
  if not ok then
    error(format("worker %s has no handler supervisor after 10 s\n%s", tostring(bare),
      tail(self:error_log())), 2)
  end
end

--- The pid of the worker that served a request for the harness's location,
-- or nil.
function Server:serving_pid()
  local status, body = http.get(self.port, PING, 2000)
  return status == 200 and tonumber(body) or nil
end

--- Reloads the configuration (SIGHUP) and waits until the old workers are
-- gone and the new ones, as many as configured, serve.
function Server:reload()
  local old = self:workers()
  local old_ids = M.identify(old)
  local old_set = H.set_of(old)
  C.hd_ngx_kill(self.pid, SIGHUP)
  local why
  local ok = wait_for(function()
    if self:exited() then
      why = "the master exited: " .. self.exit
      return true
    end
    local left = M.living(old_ids)
    if #left > 0 then
      why = "old workers still running: " .. M.describe(left)
      return false
    end
    local now = self:workers()
    if #now ~= self.n then
      why = format("%d workers, %d configured", #now, self.n)
      return false
    end
    local pid = self:serving_pid()
    why = "no new worker serves (served by " .. tostring(pid) .. ")"
    return pid ~= nil and not old_set[pid] and H.contains(now, pid)
  end, M.RELOAD_S)
  if not ok or self.exit then self:fail("nginx reload: " .. why) end
end

--- Graceful shutdown (SIGQUIT): returns once the master has exited.
function Server:quit()
  if self:exited() then return end
  C.hd_ngx_kill(self.pid, SIGQUIT)
  if not wait_for(function() return self:exited() end, M.QUIT_S) then
    self:fail(format("nginx quit: the master %d is still running after %d s", self.pid, M.QUIT_S))
  end
end

--- Stops nginx whatever its state (SIGTERM; SIGKILL to the master and to all
-- it had started after STOP_S), reaps the master, kills whatever it had
-- started that is still running 2 s after (handler's processes left behind
-- by a worker), and removes the prefix. Returns the processes it had to
-- kill that way (empty when all went by themselves).
function Server:stop()
  if self.stopped then return {} end
  self.stopped = true
  live[self] = nil
  local forced = {}
  if not self:exited() then
    local ids = M.identify(M.descendants_of(self.pid))
    C.hd_ngx_kill(self.pid, SIGTERM)
    if not wait_for(function() return self:exited() end, M.STOP_S) then
      C.hd_ngx_kill(self.pid, SIGKILL)
      wait_for(function() return self:exited() end, M.STOP_S)
    end
    wait_for(function() return #M.living(ids) == 0 end, 2)
    for _, id in ipairs(M.living(ids)) do
      C.hd_ngx_kill(id.pid, SIGKILL)
      forced[#forced + 1] = id
    end
  end
  if getenv("HANDLER_NGINX_KEEP") ~= "1" then H.rm_r(self.prefix) end
  return forced
end

--- Stops every server started and not stopped yet.
function M.stop_all()
  local list = {}
  for srv in pairs(live) do list[#list + 1] = srv end
  for _, srv in ipairs(list) do srv:stop() end
end

-- When this process's Lua state closes, whatever is left is stopped too.
local sentinel = newproxy(true)
getmetatable(sentinel).__gc = function() pcall(M.stop_all) end
M._sentinel = sentinel

--- Makes the prefix: a private directory under /tmp that nobody can enter
-- (nginx's workers run as nobody when the master is root), holding a copy
-- of the module readable by all.
local function make_prefix(srv)
  local lua_dir, build_dir = M.lua_dir(), M.build_dir()
  if lua_dir == nil then error("nginx harness: handler's Lua files are not on package.path", 3) end
  if build_dir == nil or not H.exists(build_dir .. "/handler/core.so") then
    error("nginx harness: no handler/core.so in the build directory " .. tostring(build_dir)
      .. " (set HANDLER_TEST_BUILD)", 3)
  end
  local p = io.popen("mktemp -d /tmp/handler-nginx.XXXXXX")
  local prefix = p:read("*l")
  p:close()
  if prefix == nil or prefix == "" then error("nginx harness: mktemp -d failed", 3) end
  srv.prefix = prefix
  srv.lua_dir, srv.lib_dir = prefix .. "/lua", prefix .. "/lib"
  local ok = sh_ok(format("mkdir -p %s/tmp %s %s && cp -R %s/handler %s/ && cp -R %s/handler %s/"
    .. " && chmod -R a+rX %s", q(prefix), q(srv.lua_dir), q(srv.lib_dir), q(lua_dir), q(srv.lua_dir),
    q(build_dir), q(srv.lib_dir), q(prefix)))
  if not ok then
    H.rm_r(prefix)
    error("nginx harness: cannot copy the module into " .. prefix, 3)
  end
end

--- Starts nginx (see the top of this file); returns the server once it
-- serves with all its workers.
function M.start(opts)
  opts = opts or {}
  local ok, why = M.available()
  if not ok then error("nginx harness: " .. why, 2) end
  local srv = setmetatable({ n = opts.workers or 1 }, Server)
  make_prefix(srv)
  local conf, log = srv.prefix .. "/nginx.conf", srv.prefix .. "/error.log"
  local argv = { NGINX, "-p", srv.prefix .. "/", "-c", conf, "-e", log }
  if SETPRIV then
    table.insert(argv, 1, SETPRIV)
    table.insert(argv, 2, "--pdeathsig")
    table.insert(argv, 3, "TERM")
  end
  -- Another process may bind the port between free_port and nginx: then
  -- nginx exits saying so (after its own retries, 2.5 s) and we try again.
  for _ = 1, 5 do
    srv.port = free_port()
    H.write_file(conf, config(srv, opts))
    H.write_file(log, "")
    srv.pid = spawn(argv, nginx_env(), srv.prefix .. "/output.log")
    srv.exit = nil
    live[srv] = true
    local served = wait_for(function()
      return srv:exited() or (srv:serving_pid() ~= nil and #srv:workers() == srv.n)
    end, M.START_S)
    if served and not srv.exit then return srv end
    local text = srv:error_log()
    if not (srv.exit and text:find("Address already in use", 1, true)) then
      local what = srv.exit and ("nginx exited (" .. srv.exit .. ") at start")
        or format("nginx does not serve %d workers on port %d after %d s", srv.n, srv.port, M.START_S)
      local fail_ok, err = pcall(srv.fail, srv, what)
      srv:stop()
      error(fail_ok and what or err, 2)
    end
  end
  srv:stop()
  error("nginx harness: no free port after 5 tries", 2)
end

--- For a spec that starts nginx some other way (a script of the project's):
-- spawn(argv, env, out_path) -> pid (posix_spawn, as for the harness's
-- nginx), env() the environment nginx gets, free_port(), and
-- reap(pid, seconds) -> "exit N" | "signal N" | nil when it did not end in time.
M.spawn = spawn
M.env = nginx_env
M.free_port = free_port
function M.reap(pid, seconds)
  local st, how = ffi.new("int[1]"), nil
  wait_for(function()
    local r = C.hd_ngx_waitpid(pid, st, WNOHANG)
    if r == 0 then return false end
    if r < 0 then how = "gone"
    elseif st[0] % 128 == 0 then how = "exit " .. math.floor(st[0] / 256) % 256
    else how = "signal " .. st[0] % 128 end
    return true
  end, seconds or 10)
  return how
end

--- Locations the nginx specs share: /run (a trivial job: "true 42"),
-- /cause?kind=ok&n=N|timeout|oom|segv|error (a job that ends that way:
-- "ok <result>" or "type|reason|message"), /uid ("true <job's uid> <nginx
-- worker's pid>").
M.JOB_LOCATIONS = [[
  location = /run {
    content_by_lua_block {
      local ok, v = require("handler").run(function() return 6 * 7 end)
      ngx.print(tostring(ok), " ", tostring(v))
    }
  }
  location = /cause {
    content_by_lua_block {
      local handler = require("handler")
      local kind, ok, err = ngx.var.arg_kind
      if kind == "ok" then
        local n = tonumber(ngx.var.arg_n)
        ok, err = handler.run(function() return n * n end)
      elseif kind == "timeout" then
        ok, err = handler.run(function() while true do end end, { max_ms = 100 })
      elseif kind == "oom" then
        ok, err = handler.run(function()
          local t = {}
          for i = 1, 1e7 do t[i] = { i } end
          return #t
        end, { max_heap_bytes = 65536 })
      elseif kind == "segv" then
        ok, err = handler.run(function() require("ffi").cast("int *", 0)[0] = 1 end)
      elseif kind == "error" then
        ok, err = handler.run(function() error("boom", 0) end)
      end
      if ok then
        ngx.print("ok ", tostring(err))
      else
        ngx.print(tostring(err.type), "|", tostring(err.reason), "|", tostring(err.message))
      end
    }
  }
  location = /uid {
    content_by_lua_block {
      local ok, uid = require("handler").run(function()
        local f = io.open("/proc/self/status")
        local s = f:read("*a")
        f:close()
        return s:match("Uid:%s*(%d+)")
      end)
      ngx.print(tostring(ok), " ", tostring(uid), " ", ngx.worker.pid())
    }
  }
]]

--- The handler processes among ids (from identify).
function M.handler_procs(ids)
  local out = {}
  for _, id in ipairs(ids) do
    if id.cmd:sub(1, 8) == "handler:" then out[#out + 1] = id end
  end
  return out
end

return M
