-- spec/support/helpers.lua: shared helpers for the specs: a clock, polling
-- with a deadline, the host's open fds, process states from /proc, subprocess
-- hosts, and the "nothing leaked" check every process-starting test ends with.
local ffi = require("ffi")
local handler = require("handler")
local luassert = require("luassert")

local format, concat, sort, open, popen = string.format, table.concat, table.sort, io.open, io.popen
local tonumber, tostring, ipairs, pairs, type = tonumber, tostring, ipairs, pairs, type

-- Declarations under our own names (asm labels), so they never clash with a
-- declaration another spec made of the same C function.
local function cdef(s)
  pcall(ffi.cdef, s)
end
cdef [[int hd_spec_getpid(void) __asm__("getpid");]]
cdef [[int hd_spec_fcntl(int fd, int cmd, ...) __asm__("fcntl");]]
cdef [[typedef struct { long sec; long nsec; } hd_spec_timespec;]]
cdef [[int hd_spec_clock_gettime(int clk, hd_spec_timespec *ts) __asm__("clock_gettime");]]
cdef [[typedef struct { int fd; short events; short revents; } hd_spec_pollfd;]]
cdef [[int hd_spec_poll(hd_spec_pollfd *fds, unsigned long n, int ms) __asm__("poll");]]
cdef [[typedef struct {
  uint64_t ino; int64_t off; unsigned short reclen; unsigned char type; char name[256];
} hd_spec_dirent;]]
cdef [[void *hd_spec_opendir(const char *path) __asm__("opendir");]]
cdef [[hd_spec_dirent *hd_spec_readdir(void *dir) __asm__("readdir");]]
cdef [[int hd_spec_closedir(void *dir) __asm__("closedir");]]
cdef [[int hd_spec_kill(int pid, int sig) __asm__("kill");]]
cdef [[long hd_spec_readlink(const char *path, char *buf, unsigned long n) __asm__("readlink");]]
cdef [[int hd_spec_mkfifo(const char *path, unsigned int mode) __asm__("mkfifo");]]

local C = ffi.C
local F_GETFD = 1
local CLOCK_MONOTONIC = 1
local POLLIN = 1

local M = {}

M.getpid = function()
  return C.hd_spec_getpid()
end

--- Seconds on a monotonic clock.
local ts = ffi.new("hd_spec_timespec")
function M.now()
  C.hd_spec_clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.sec) + tonumber(ts.nsec) / 1e9
end

--- How long the host waits for a killed worker's exit report before it ends
-- the job anyway (HD_KILL_GRACE_MS in src/host/job.c).
M.KILL_GRACE_S = 2

--- Asserts that something with a deadline of `deadline_ms` (a job's max_ms,
-- a queued job's pool_timeout), which took `took` seconds from before it was
-- submitted, ended within KILL_GRACE_S of its deadline. An idle machine ends
-- it within a few ms; a loaded one gets two seconds. No more: a job whose
-- kill went unconfirmed ends only when the kill grace runs out, at least
-- KILL_GRACE_S after the deadline, and this must still tell the two apart.
function M.assert_ended_by(took, deadline_ms)
  luassert(took < deadline_ms / 1000 + M.KILL_GRACE_S,
    format("ended %.3f s after it was submitted, %d ms deadline", took, deadline_ms))
end

--- Sleeps ms milliseconds.
function M.sleep_ms(ms)
  C.hd_spec_poll(nil, 0, ms)
end

--- Waits up to ms for fd to become readable; true if it did.
function M.readable(fd, ms)
  local p = ffi.new("hd_spec_pollfd[1]")
  p[0].fd = fd
  p[0].events = POLLIN
  return C.hd_spec_poll(p, 1, ms) > 0
end

--- Polls pred() every 10 ms until it returns true or `seconds` (default 5)
-- pass; drives handler's loop between tries (without blocking), so timers
-- and process exits it watches are processed. Returns whether pred held.
function M.wait_until(pred, seconds)
  local deadline = M.now() + (seconds or 5)
  while true do
    if pred() then return true end
    if M.now() > deadline then return false end
    handler.step()
    M.sleep_ms(10)
  end
end

---------------------------------------------------------------------------
-- File descriptors of this process.

--- The sorted list of fds open in this process.
function M.open_fds()
  local fds = {}
  for fd = 0, 4095 do
    if C.hd_spec_fcntl(fd, F_GETFD) >= 0 then fds[#fds + 1] = fd end
  end
  return fds
end

--- { {fd=, target=}, ... } of the host's open fds: what /proc/self/fd/N
-- links to ("socket:[...]", "anon_inode:[pidfd]", a path), "?" when the
-- link cannot be read.
local function fd_targets()
  local out, buf = {}, ffi.new("char[256]")
  for _, fd in ipairs(M.open_fds()) do
    local n = tonumber(C.hd_spec_readlink("/proc/self/fd/" .. fd, buf, 255))
    out[#out + 1] = { fd = fd, target = n > 0 and ffi.string(buf, n) or "?" }
  end
  return out
end

--- How many of the host's fds are sockets, pidfds, pipes and anything else.
function M.fd_kinds()
  local k = { sockets = 0, pidfds = 0, pipes = 0, other = 0 }
  for _, f in ipairs(fd_targets()) do
    if f.target:sub(1, 7) == "socket:" then
      k.sockets = k.sockets + 1
    elseif f.target:sub(1, 5) == "pipe:" then
      k.pipes = k.pipes + 1
    elseif f.target:find("pidfd", 1, true) then
      k.pidfds = k.pidfds + 1
    else
      k.other = k.other + 1
    end
  end
  return k
end

--- "fd:target ..." of the host's open fds, for messages.
function M.fd_list()
  local out = {}
  for i, f in ipairs(fd_targets()) do out[i] = f.fd .. ":" .. f.target end
  return concat(out, " ")
end

---------------------------------------------------------------------------
-- Processes, from /proc.

--- The numeric entries of /proc.
function M.all_pids()
  local out = {}
  local d = C.hd_spec_opendir("/proc")
  if d == nil then return out end
  while true do
    local e = C.hd_spec_readdir(d)
    if e == nil then break end
    local n = tonumber(ffi.string(e.name))
    if n then out[#out + 1] = n end
  end
  C.hd_spec_closedir(d)
  return out
end

--- state, ppid of a process, or nil when /proc has no such process.
function M.proc_state(pid)
  local f = open("/proc/" .. tostring(pid) .. "/stat")
  if f == nil then return nil end
  local s = f:read("*a")
  f:close()
  if s == nil then return nil end
  -- The command name may hold spaces and parentheses: parse after the last ')'.
  local state, ppid = s:match("^.*%) (%S) (%d+)")
  return state, tonumber(ppid)
end

--- A process exists and is not a zombie.
function M.alive(pid)
  local st = M.proc_state(pid)
  return st ~= nil and st ~= "Z" and st ~= "X"
end

--- /proc has no trace of the process at all (reaped, not a zombie).
function M.gone(pid)
  return M.proc_state(pid) == nil
end

--- { {pid=, state=}, ... } of the children of ppid.
function M.children(ppid)
  local out = {}
  for _, pid in ipairs(M.all_pids()) do
    local st, pp = M.proc_state(pid)
    if st and pp == ppid then out[#out + 1] = { pid = pid, state = st } end
  end
  return out
end

--- Live worker pids handler knows about (a list), and the supervisor's pid.
function M.workers()
  local p = handler._core.procs()
  local list = {}
  for i = 1, #p do list[i] = p[i] end
  return list, p.supervisor
end

function M.contains(list, v)
  for _, x in ipairs(list) do
    if x == v then return true end
  end
  return false
end

--- { [v] = true } of the values of list.
function M.set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

--- Live worker pids that are not in `before` (a set, see set_of).
function M.new_workers(before)
  local out = {}
  for _, pid in ipairs(M.workers()) do
    if not before[pid] then out[#out + 1] = pid end
  end
  return out
end

--- Waits until a worker that is not in `before` (a set) is listed, and
-- returns the first such pid (nil after 5 s).
function M.new_worker(before)
  local pid
  M.wait_until(function()
    pid = M.new_workers(before)[1]
    return pid ~= nil
  end)
  return pid
end

---------------------------------------------------------------------------
-- Job bodies used across the specs. They run in the worker, so they use only
-- what a fresh state has.
--
-- They are made anew by each call of job_bodies, not kept as fields of this
-- module: a function that is a field of a loaded module travels by name,
-- and the worker would load this module (and with it handler and luassert)
-- to find it.

function M.job_bodies()
  local b = {}

  --- A job returning the pid of the worker process it ran in.
  function b.pid()
    local f = require("ffi")
    pcall(f.cdef, "int getpid(void);")
    return f.C.getpid()
  end

  --- Called in a job: writes the worker's pid to path (see read_number).
  function b.report_pid(path)
    local f = require("ffi")
    pcall(f.cdef, "int getpid(void);")
    local out = io.open(path, "w")
    out:write(f.C.getpid())
    out:close()
  end

  --- A job that reads through a NULL pointer: its worker ends with SIGSEGV.
  function b.segv()
    return require("ffi").cast("int *", 0)[0]
  end

  --- A job that returns `ret` once the gate at `path` opens: a FIFO whose
  -- read blocks until the test closes its end, or a file (see pool_spec).
  function b.waiter(path, ret)
    return function()
      local f = io.open(path, "r")
      if f then
        f:read(1)
        f:close()
      end
      return ret
    end
  end

  --- A job returning the soft and hard limit of each of `resources` (RLIMIT_
  -- numbers) in turn.
  function b.rlimits(resources)
    return function()
      local f = require("ffi")
      f.cdef [[struct hd_spec_rlimit { unsigned long cur, max; };
        int getrlimit(int res, struct hd_spec_rlimit *r);]]
      local out = {}
      for _, res in ipairs(resources) do
        local rl = f.new("struct hd_spec_rlimit")
        f.C.getrlimit(res, rl)
        out[#out + 1] = tonumber(rl.cur)
        out[#out + 1] = tonumber(rl.max)
      end
      return unpack(out)
    end
  end

  --- A job returning the fds open in its process, "0,1,2,3" say.
  b.fds = luassert(loadstring("return " .. M.FDS_JOB_SOURCE, "=fds job"))()

  return b
end

--- The source of the fds job (a function expression), for host scripts.
M.FDS_JOB_SOURCE = [[function()
  local f = require("ffi")
  pcall(f.cdef, "int fcntl(int fd, int cmd, ...);")
  local open = {}
  for fd = 0, 1023 do
    if f.C.fcntl(fd, 1) >= 0 then open[#open + 1] = fd end
  end
  return table.concat(open, ",")
end]]

---------------------------------------------------------------------------
-- Jobs that resolve exactly once.

--- Submits fn to pool, awaits it, and checks that it resolved exactly once:
-- done, a second await gives the same outcome (the same values, compared
-- deeply when tables, or an error of the same type and message), and the
-- pool counted one start and one end. Returns the results packed.
function M.resolve(pool, fn, opts)
  local before = pool:stats()
  local job, why = pool:async(fn, opts)
  luassert(job, "rejected: " .. tostring(why))
  local r = M.pack(job:await())
  luassert.is_true(job:done())
  local again = M.pack(job:await())
  luassert.are.equal(r[1], again[1])
  if r[1] then
    luassert.are.equal(r.n, again.n)
    for i = 2, r.n do
      if type(r[i]) == "table" then
        luassert.are.same(r[i], again[i])
      else
        luassert.are.equal(r[i], again[i])
      end
    end
  else
    luassert.are.equal(r[2].type, again[2].type)
    luassert.are.equal(r[2].message, again[2].message)
  end
  local after = pool:stats()
  luassert.are.equal(before.started + 1, after.started)
  luassert.are.equal(before.succeeded + before.failed + 1, after.succeeded + after.failed)
  return r
end

--- Asserts that packed results r are a failure with an error table, of
-- type `kind` when given; returns the error.
function M.expect_failure(r, kind)
  luassert.is_false(r[1], "expected the job to fail, it returned " .. tostring(r[2]))
  luassert.are.equal("table", type(r[2]))
  if kind then luassert.are.equal(kind, r[2].type, tostring(r[2].message)) end
  return r[2]
end

---------------------------------------------------------------------------
-- Subprocess hosts.

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end
M.shell_quote = shell_quote

--- The env prefix a subprocess luajit needs to load the same handler build.
function M.lua_env()
  return "LUA_PATH=" .. shell_quote(package.path) .. " LUA_CPATH=" .. shell_quote(package.cpath)
end

--- A fresh temporary directory (removed by rm_r).
function M.tmpdir()
  local p = popen("mktemp -d")
  local d = p:read("*l")
  p:close()
  return d
end

--- A temporary directory a sandboxed job can read: under the spec's own
-- directory, which is on package.path and so in every sandboxed worker's
-- view (read-only). Remove it with rm_r.
function M.visible_tmpdir()
  local base = (os.getenv("PWD") or ".") .. "/.spec-tmp"
  os.execute("mkdir -p " .. M.shell_quote(base))
  local p = popen("mktemp -d " .. M.shell_quote(base .. "/XXXXXX"))
  local d = p:read("*l")
  p:close()
  -- Sandboxed jobs run as another user (nobody, when the host is root).
  os.execute("chmod 755 " .. M.shell_quote(base) .. " " .. M.shell_quote(d))
  return d
end

--- All the values of a call, with their count (nils kept).
function M.pack(...)
  return { n = select("#", ...), ... }
end

--- What fn(file) gives for the file at path opened for reading, or nil
-- when it cannot be opened.
local function with_file(path, fn)
  local f = open(path, "rb")
  if f == nil then return nil end
  local v = fn(f)
  f:close()
  return v
end

--- A file's whole contents, or nil when it cannot be opened.
function M.read_file(path)
  return with_file(path, function(f) return f:read("*a") end)
end

--- A file's size in bytes, or nil when it cannot be opened.
function M.file_size(path)
  return with_file(path, function(f) return f:seek("end") end)
end

--- The number a file holds, or nil when it cannot be opened or holds none.
function M.read_number(path)
  local s = M.read_file(path)
  return s and tonumber(s)
end

function M.exists(path)
  local f = open(path)
  if f == nil then return false end
  f:close()
  return true
end

function M.write_file(path, text)
  local f = luassert(open(path, "w"))
  f:write(text)
  f:close()
end

function M.rm_r(path)
  os.execute("rm -rf " .. shell_quote(path))
end

--- Makes a FIFO at path (mode 0600); asserts it was made.
function M.mkfifo(path)
  luassert(C.hd_spec_mkfifo(path, 384) == 0, "mkfifo " .. path)
end

--- Runs `luajit script` (the script given as text) with the spec's handler on
-- its paths, and returns everything it printed (stdout and stderr). Output
-- goes to a file, not a pipe, so a process that outlived the script cannot
-- keep us waiting; the script itself is killed after 60 s.
function M.run_host(script)
  local dir = M.tmpdir()
  local path, out = dir .. "/host.lua", dir .. "/out"
  M.write_file(path, script)
  os.execute(M.lua_env() .. " timeout -s KILL 60 luajit " .. shell_quote(path) .. " > "
    .. shell_quote(out) .. " 2>&1")
  local f = open(out)
  local text = f and f:read("*a") or ""
  if f then f:close() end
  M.rm_r(dir)
  return text
end

--- Runs `script` as run_host does, but as nobody (65534) when the spec runs
-- as root, so that what is tested is a host of an ordinary user and not
-- root's capabilities. Returns what it printed.
function M.run_host_as_nobody(script)
  local dir = M.tmpdir()
  local id = popen("id -u")
  local uid = tonumber(id:read("*l"))
  id:close()
  local as = ""
  if uid == 0 and os.execute("command -v setpriv >/dev/null 2>&1") == 0 then
    os.execute("chmod 777 " .. shell_quote(dir))
    as = "setpriv --reuid=65534 --regid=65534 --clear-groups "
  end
  M.write_file(dir .. "/host.lua", script)
  os.execute(as .. "env TMPDIR=/tmp " .. M.lua_env() .. " timeout -s KILL 60 luajit "
    .. shell_quote(dir .. "/host.lua") .. " > " .. shell_quote(dir .. "/out") .. " 2>&1")
  local out = M.read_file(dir .. "/out") or ""
  M.rm_r(dir)
  return out
end

--- Asserts that `text` holds each string of `list` (plain, not patterns).
function M.assert_has_all(text, list)
  for _, s in ipairs(list) do luassert.matches(s, text, 1, true) end
end

--- Sends SIGKILL to pid.
--- A job body that keeps its worker busy for `ms` (os.clock is CPU time)
-- and returns `ms`.
function M.busy_job(ms)
  return function()
    local t = os.clock()
    while (os.clock() - t) * 1000 < ms do end
    return ms
  end
end

--- Sends signal `sig` to pid.
function M.signal(pid, sig)
  return C.hd_spec_kill(pid, sig) == 0
end

function M.kill9(pid)
  return C.hd_spec_kill(pid, 9) == 0
end

---------------------------------------------------------------------------
-- The leak check.

--- Starts the handler core (the supervisor, the loop and their fds) so a
-- snapshot taken after it measures only what a test adds.
function M.warm()
  luassert.is_true((handler.run(function() end)))
end

--- Declares, in the describe block it is called from, the leak check of a
-- block whose tests start processes: H.warm() in setup, a snapshot before
-- each test (kept in the returned table as `snap`, for tests that check
-- mid-way) and assert_clean against it after each test.
function M.leak_checked()
  local busted = require("busted")
  local state = {}
  busted.setup(M.warm)
  busted.before_each(function() state.snap = M.snapshot() end)
  busted.after_each(function() M.assert_clean(state.snap) end)
  return state
end

--- What "clean" is measured against: the host's fds apart from those each
-- live worker holds (its socket, its output pipes, its pidfd).
function M.snapshot()
  -- Files an earlier test left to the collector are closed now, not in
  -- the middle of this test's count.
  collectgarbage()
  collectgarbage()
  -- procs() first, and nothing that reads the supervisor's reports between
  -- it and the listing: a report can bring a pidfd in, which the count
  -- would then have and the listing not.
  local sockets = handler._core.procs().sockets
  local fds = M.open_fds()
  return { fds = fds, base = #fds - sockets }
end

local function describe_fds(fds)
  return "{" .. concat(fds, ",") .. "}"
end

local function describe_children(list)
  local s = {}
  for i, c in ipairs(list) do s[i] = c.pid .. ":" .. c.state end
  return "{" .. concat(s, ",") .. "}"
end

--- Asserts that nothing a test started was left behind: no job running and
-- no budget committed in the default pool and in `pools`; every child of the
-- supervisor is a live worker handler knows about (no zombie, no stray) and
-- every known worker is alive; the host has no child but the supervisor; and
-- the host holds no fd beyond the snapshot's, one per live worker aside.
-- Eventual conditions get a deadline of 5 s.
function M.assert_clean(snap, pools)
  local all = { handler.default_pool() }
  for _, p in ipairs(pools or {}) do all[#all + 1] = p end
  local why
  local ok = M.wait_until(function()
    for _, p in ipairs(all) do
      local s = p:stats()
      if s.running ~= 0 or s.bytes_committed ~= 0 or s.queued ~= 0 then
        why = format("%s still has running=%d queued=%d bytes_committed=%d", tostring(p),
          s.running, s.queued, s.bytes_committed)
        return false
      end
    end
    local workers, sup = M.workers()
    for _, pid in ipairs(workers) do
      if not M.alive(pid) then
        why = format("worker %d is listed by procs() but is %s", pid,
          tostring(M.proc_state(pid) or "gone"))
        return false
      end
    end
    if sup ~= nil then
      local kids = M.children(sup)
      for _, c in ipairs(kids) do
        if c.state == "Z" or not M.contains(workers, c.pid) then
          why = format("supervisor %d has children %s, procs() lists {%s}", sup,
            describe_children(kids), concat(workers, ","))
          return false
        end
      end
    end
    local host_kids = M.children(M.getpid())
    for _, c in ipairs(host_kids) do
      if c.pid ~= sup or c.state == "Z" then
        why = "the host has children " .. describe_children(host_kids)
        return false
      end
    end
    -- As in snapshot: the count first, then the listing, nothing between.
    local sockets = handler._core.procs().sockets
    local fds = M.open_fds()
    -- A leak is a descriptor more than before, beyond the socket and pidfd
    -- of each live worker. One fewer is not: a worker's descriptors that
    -- existed at the snapshot may close while a test runs.
    if #fds - sockets > snap.base then
      why = format("host fds %s with %d workers; before: %s with base %d; sockets %d; %s",
        describe_fds(fds), #workers, describe_fds(snap.fds), snap.base, sockets, M.fd_list())
      return false
    end
    return true
  end, 5)
  luassert(ok, why)
end

---------------------------------------------------------------------------
-- The strict check of the pool specs: not "no more fds than before" but
-- exactly the descriptors the live workers account for, and every worker
-- left an idle sleeper.

-- The host's pipe descriptors per worker: its ends of the reply, job and
-- two output pipes, and the job pipe's read end it keeps.
local WORKER_PIPES = 5

--- Whether the core's workers and the host's descriptors agree now: every
-- listed worker is an idle sleeper (state S), the core holds five pipe
-- descriptors (its ends of the reply, job and output pipes, and the job
-- pipe's kept read end) and a pidfd for each (procs().sockets), and the
-- host has at least those pipes, one pidfd per listed worker, and no
-- socket but the supervisor's, plus the pidfd the supervisor is waited on
-- by. A dying, retiring or just-killed worker passes through states where
-- they disagree (it stays listed, its pipes closed, until its exit is
-- reported; a killed one may be listed only once its pid arrives).
-- Steps the loop first.
function M.settled_now()
  handler.step()
  local list = handler._core.procs()
  for _, pid in ipairs(list) do
    if M.proc_state(pid) ~= "S" then return false end
  end
  local sup = list.supervisor and 1 or 0
  local k = M.fd_kinds()
  return list.sockets == (WORKER_PIPES + 1) * #list and k.sockets == sup
    and k.pidfds == #list + sup and k.pipes >= WORKER_PIPES * #list
end

--- The host's pipes that are not its workers' (its own stdout, say, and
-- the module's copy of it).
local function other_pipes()
  return M.fd_kinds().pipes - WORKER_PIPES * #handler._core.procs()
end

--- What assert_fds_back compares against, taken once settled (or after
-- 5 s) and after a full collection: the count of the host's fds that are
-- neither sockets, pipes nor pidfds, the pipes that are not its workers',
-- and their listing for messages.
function M.fd_baseline()
  collectgarbage()
  collectgarbage()
  M.wait_until(M.settled_now)
  return { other = M.fd_kinds().other, pipes = other_pipes(), list = M.fd_list() }
end

--- Asserts, after a full collection, that the host settles (see
-- settled_now) and then holds exactly as many other fds as at `base`, and
-- no more pipes than its workers' and those it had then.
function M.assert_fds_back(base)
  collectgarbage()
  collectgarbage()
  luassert(M.wait_until(M.settled_now), format("host sockets %d and pidfds %d for workers {%s}: %s",
    M.fd_kinds().sockets, M.fd_kinds().pidfds, concat(M.workers(), ","), M.fd_list()))
  luassert(M.wait_until(function() return M.fd_kinds().other == base.other end),
    format("host fds other than sockets, pipes and pidfds: %d, before: %d\nnow: %s\nbefore: %s",
      M.fd_kinds().other, base.other, M.fd_list(), base.list))
  luassert(M.wait_until(function() return other_pipes() == base.pipes end),
    format("host pipes beside its workers': %d, before: %d\nnow: %s\nbefore: %s",
      other_pipes(), base.pipes, M.fd_list(), base.list))
end

--- Asserts that every pid list_fn() gives becomes an idle sleeper (state S)
-- within 5 s, and `also()` with it when given; `ctx` ends the message.
function M.assert_idle(list_fn, also, ctx)
  local stuck
  luassert(M.wait_until(function()
    stuck = nil
    for _, pid in ipairs(list_fn()) do
      if M.proc_state(pid) ~= "S" then stuck = pid end
    end
    return stuck == nil and (also == nil or also())
  end), format("worker %s is %s, not an idle sleeper%s", tostring(stuck),
    tostring(stuck and M.proc_state(stuck)), ctx or ""))
end

--- Asserts that list_fn() becomes empty and that none of `pids` stays alive.
function M.assert_workers_gone(list_fn, pids)
  luassert(M.wait_until(function() return #list_fn() == 0 end),
    "workers left after close: " .. concat(list_fn(), ","))
  for _, pid in ipairs(pids) do
    luassert(M.wait_until(function() return not M.alive(pid) end),
      "worker " .. pid .. " still alive")
  end
end

return M
