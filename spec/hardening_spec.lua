-- hardening_spec.lua: hostile and broken jobs. Each test runs one
-- fault and then checks what must hold under every fault: the host is alive
-- and responsive (a run returns true, 2), its fd count is unchanged, nothing
-- the job started is left (processes tagged by an environment variable, by a
-- marker in their command line, by the pids the job recorded, and anything
-- still under the supervisor that is not a worker), every pool is back to
-- running == 0 and bytes_committed == 0, and the job resolved exactly once.
-- Covered: time, memory, crashes and exits, the process tree (including a
-- host killed with SIGKILL), what a job can see, output, max_result_bytes,
-- and isolation between jobs that share a worker process.
local handler = require("handler")
local H = require("spec.support.helpers")
local ffi = require("ffi")

local format, concat, tostring, tonumber, ipairs, type, select, pcall =
  string.format, table.concat, tostring, tonumber, ipairs, type, select, pcall
local open = io.open

-- Our own names for the C functions the host calls (asm labels), so they
-- never clash with another spec's declarations.
local function cdef(s)
  pcall(ffi.cdef, s)
end
cdef [[int hd_hard_setenv(const char *k, const char *v, int o) __asm__("setenv");]]
cdef [[int hd_hard_unsetenv(const char *k) __asm__("unsetenv");]]
cdef [[int hd_hard_socket(int d, int t, int p) __asm__("socket");]]
cdef [[int hd_hard_listen(int fd, int n) __asm__("listen");]]
cdef [[int hd_hard_close(int fd) __asm__("close");]]
cdef [[int hd_hard_kill(int pid, int sig) __asm__("kill");]]
local C = ffi.C

-- Sanitized (ASan) builds have no RLIMIT_DATA backstop in their workers
-- (ASan's shadow memory would trip it), so the tests of that limit are
-- pending there.
local it_rlimit_data = handler._core.sanitized and pending or it

local read_file, exists = H.read_file, H.exists

---------------------------------------------------------------------------
-- Processes.

local all_pids = H.all_pids

-- state, ppid, start time of a process, or nil.
local function stat(pid)
  local s = read_file("/proc/" .. pid .. "/stat")
  if s == nil then return nil end
  local state, ppid, rest = s:match("^.*%) (%S) (%d+) (.*)$")
  if state == nil then return nil end
  -- Fields 5 to 21, then the start time (field 22).
  local start = rest:match("^" .. ("%S+ "):rep(17) .. "(%d+)")
  return state, tonumber(ppid), start
end

local function live(pid)
  local st = stat(pid)
  return st ~= nil and st ~= "Z" and st ~= "X"
end

local function cmdline(pid)
  return (((read_file("/proc/" .. pid .. "/cmdline") or ""):gsub("%z", " ")))
end

-- A unique marker per test: a sleep duration ("sleep 1000.<digits>") that
-- shows in the command line of every process a job starts with it, and an
-- environment tag that jobs pass to the programs they run.
local serial = 0
local function new_marks()
  serial = serial + 1
  local mark = format("1000.%05d%04d", H.getpid() % 100000, serial)
  local tag = format("hd-hardening-%d-%d", H.getpid(), serial)
  return mark, tag
end

-- The pid file a job writes: one "pid start" line per process it started.
local function recorded(path)
  local out = {}
  for line in (read_file(path) or ""):gmatch("[^\n]+") do
    local pid, start = line:match("^(%d+) (%d+)")
    if pid then out[#out + 1] = { pid = tonumber(pid), start = start } end
  end
  return out
end

-- Live processes the job started: any process (not a zombie) whose command
-- line holds `mark` or whose environment holds HANDLER_TEST_TAG=tag, any pid
-- in the pid file that still is the process recorded there, and any
-- descendant of the supervisor that is not a worker handler knows.
local function strays(mark, tag, pidfile)
  local out = {}
  local workers, sup = H.workers()
  local known = {}
  for _, pid in ipairs(workers) do known[pid] = true end
  local me = H.getpid()
  local ppids, states = {}, {}
  local pids = all_pids()
  for _, pid in ipairs(pids) do
    local st, pp = stat(pid)
    states[pid], ppids[pid] = st, pp
  end
  local function under_sup(pid)
    for _ = 1, 64 do
      local pp = ppids[pid]
      if pp == nil or pp <= 1 then return false end
      if pp == sup then return true end
      pid = pp
    end
    return false
  end
  local seen = {}
  local function add(pid, why)
    if seen[pid] then return end
    seen[pid] = true
    out[#out + 1] = format("%d (%s: %s)", pid, why, cmdline(pid))
  end
  local needle = tag and ("HANDLER_TEST_TAG=" .. tag .. "\0")
  for _, pid in ipairs(pids) do
    local st = states[pid]
    if st and st ~= "Z" and st ~= "X" and pid ~= me and pid ~= sup and not known[pid] then
      if sup and under_sup(pid) then add(pid, "under the supervisor") end
      if mark and cmdline(pid):find(mark, 1, true) then add(pid, "marked command line") end
      if needle then
        local env = read_file("/proc/" .. pid .. "/environ")
        if env and env:find(needle, 1, true) then add(pid, "tagged environment") end
      end
    end
  end
  if pidfile then
    for _, r in ipairs(recorded(pidfile)) do
      local st, _, start = stat(r.pid)
      if st and st ~= "Z" and st ~= "X" and start == r.start then add(r.pid, "recorded by the job") end
    end
  end
  return out
end

-- Kills what strays() finds (cleanup after a failed assertion; every pid is
-- checked again right before the signal).
local function kill_strays(mark, tag, pidfile)
  for _ = 1, 3 do
    local list = strays(mark, tag, pidfile)
    if #list == 0 then return end
    for _, s in ipairs(list) do
      local pid = tonumber(s:match("^(%d+)"))
      if pid and live(pid) and pid ~= H.getpid() then C.hd_hard_kill(pid, 9) end
    end
    H.wait_until(function() return #strays(mark, tag, pidfile) == 0 end, 1)
  end
end

-- Polls until nothing the job started is left; asserts it took less than
-- 5 s from `since` and returns the time it took.
local function assert_nothing_survives(what, mark, tag, pidfile, since)
  local left
  local ok = H.wait_until(function()
    left = strays(mark, tag, pidfile)
    return #left == 0
  end, 6)
  local took = H.now() - since
  print(format("\n[hardening] %s: %s after %.3f s", what, ok and "nothing left" or "STILL ALIVE",
    took))
  -- Killed here when the check fails, so the next test starts clean.
  if not ok then kill_strays(mark, tag, pidfile) end
  assert(ok, "still alive after 6 s: " .. concat(left or {}, ", "))
  assert(took < 5, format("took %.3f s (more than 5 s) until nothing was left", took))
  return took
end

-- Jobs resolve exactly once (H.resolve).
local resolve, expect_failure = H.resolve, H.expect_failure

---------------------------------------------------------------------------
-- Subprocess hosts.

local sh_quote = H.shell_quote

-- Starts `luajit host.lua args...` in the background with extra
-- environment `env` (a shell prefix), stdout and stderr to files in dir.
-- Returns its pid.
local function spawn_host(dir, script, env, ...)
  H.write_file(dir .. "/host.lua", script)
  local args = {}
  for i = 1, select("#", ...) do args[i] = sh_quote(select(i, ...)) end
  -- A simple command in the background: $! is luajit itself.
  local p = io.popen("cd " .. sh_quote(dir) .. "; " .. (env or "") .. " " .. H.lua_env()
    .. " luajit host.lua " .. concat(args, " ") .. " > out 2> err & echo $!")
  local pid = tonumber(p:read("*l"))
  p:close()
  -- The shell's child may not have exec'd luajit yet.
  assert(pid and H.wait_until(function() return cmdline(pid):find("host.lua", 1, true) end, 5),
    "the host did not start")
  return pid
end

-- Runs a host script to its end (killed after 60 s), stdout and stderr to
-- files in dir; returns what it wrote to dir/res.
local function run_host(dir, script, env)
  H.write_file(dir .. "/host.lua", script)
  os.execute("cd " .. sh_quote(dir) .. " && " .. (env or "") .. " " .. H.lua_env()
    .. " timeout -s KILL 60 luajit host.lua > out 2> err")
  return read_file(dir .. "/res") or ""
end

local function rss_kb()
  local s = read_file("/proc/self/status") or ""
  return tonumber(s:match("VmRSS:%s*(%d+)")) or 0
end

---------------------------------------------------------------------------
-- Job bodies. They run in the worker: only upvalues and the standard
-- libraries.

-- In a job: appends "pid start" of process pid to path.
local function note_pid(path, pid)
  local s
  local f = io.open("/proc/" .. pid .. "/stat")
  if f then
    s = f:read("*a")
    f:close()
  end
  local rest = s and s:match("^.*%) %S %d+ (.*)$")
  local start = rest and rest:match("^" .. ("%S+ "):rep(17) .. "(%d+)")
  local out = io.open(path, "a")
  out:write(pid, " ", start or "0", "\n")
  out:close()
end

-- In a job: the pid of the worker process.
local my_pid = H.job_bodies().pid

-- In a job: starts `sleep <mark>` in the background (through `prefix`,
-- e.g. "setsid "), and waits up to 2 s for it to show it started. Returns
-- whether it did.
local function start_sleeper(prefix, mark, started)
  os.execute(prefix .. "sh -c 'touch " .. started .. "; exec sleep " .. mark
    .. "' >/dev/null 2>&1 &")
  for _ = 1, 200 do
    local f = io.open(started)
    if f then
      f:close()
      return true
    end
    os.execute("sleep 0.01")
  end
  return false
end

local TMP = (os.getenv("TMPDIR") or ""):match("^/.+") or "/tmp"

describe("hardening against hostile jobs", function()
  local pool, snap, dir
  local mark, tag, pidfile

  setup(function()
    H.warm()
    pool = handler.pool({ name = "hardening_spec" })
  end)

  teardown(function()
    pool:close()
  end)

  before_each(function()
    mark, tag = new_marks()
    dir = H.tmpdir()
    pidfile = dir .. "/pids"
    snap = H.snapshot()
  end)

  after_each(function()
    local ok, v = pool:run(function() return 1 + 1 end)
    local ok2, v2 = handler.run(function() return 1 + 1 end)
    local left
    H.wait_until(function()
      left = strays(mark, tag, pidfile)
      return #left == 0
    end, 5)
    kill_strays(mark, tag, pidfile)
    H.rm_r(dir)
    assert.is_true(ok, tostring(v))
    assert.are.equal(2, v)
    assert.is_true(ok2, tostring(v2))
    assert.are.equal(2, v2)
    assert.are.equal(0, #left, "left behind: " .. concat(left, ", "))
    H.assert_clean(snap, { pool })
  end)

  -------------------------------------------------------------------------
  describe("time: every job ends by max_ms", function()
    local function times_out(fn, max_ms, opts)
      opts = opts or {}
      opts.max_ms = max_ms
      local t0 = H.now()
      local r = resolve(pool, fn, opts)
      local took = H.now() - t0
      local err = expect_failure(r, "Timeout")
      assert.are.equal(format("Took more than %dms to complete", max_ms), err.message)
      H.assert_ended_by(took, max_ms)
      return took
    end

    it("a job spinning in JIT-compiled code", function()
      times_out(function()
        local x = 0
        for i = 1, math.huge do x = x + i % 7 end
        return x
      end, 200)
    end)

    it("a job hanging inside the VM (a pathological pattern in C)", function()
      times_out(function()
        return (("a"):rep(40)):match(("a*"):rep(40) .. "b")
      end, 200)
    end)

    it("a job blocked in a system call (reading a pipe from sleep)", function()
      times_out(function()
        return io.popen("sleep " .. mark):read("*a")
      end, 200)
      assert_nothing_survives("blocked in read", mark, tag, nil, H.now())
    end)

    it("a job that blocks every signal and ignores SIGTERM", function()
      times_out(function()
        local f = require("ffi")
        f.cdef [[
          typedef struct { unsigned long v[16]; } hd_sigset;
          int sigfillset(hd_sigset *s);
          int sigprocmask(int how, const hd_sigset *s, hd_sigset *old);
          void *signal(int sig, void *h);
        ]]
        local s = f.new("hd_sigset")
        f.C.sigfillset(s)
        f.C.sigprocmask(0, s, nil)
        for sig = 1, 31 do f.C.signal(sig, f.cast("void *", 1)) end
        while true do end
      end, 200)
    end)

    it("a job that stops itself with SIGSTOP", function()
      times_out(function()
        local f = require("ffi")
        f.cdef "int kill(int pid, int sig); int getpid(void);"
        f.C.kill(f.C.getpid(), 19)
        return "woke up"
      end, 200)
    end)
  end)

  -------------------------------------------------------------------------
  describe("memory", function()
    it("a heap that grows forever ends as OOM", function()
      local err = expect_failure(resolve(pool, function()
        local t = {}
        while true do t[#t + 1] = { #t } end
      end, { max_heap_bytes = 4e6, max_ms = 10000 }), "OOM")
      assert.are.equal("Process tried to use more than 4000000 bytes of memory", err.message)
    end)

    it("OOMs swallowed by pcall again and again still end as OOM", function()
      local err = expect_failure(resolve(pool, function()
        local caught = 0
        for _ = 1, 50 do
          local ok = pcall(function()
            local t = {}
            while true do t[#t + 1] = ("x"):rep(100) .. #t end
          end)
          if not ok then caught = caught + 1 end
        end
        return "survived " .. caught .. " OOMs"
      end, { max_heap_bytes = 4e6, max_ms = 10000 }), "OOM")
      assert.are.equal("Process tried to use more than 4000000 bytes of memory", err.message)
    end)

    it("an OOM while the worker encodes the result", function()
      -- Many small tables using 60% of the limit: building them fits, but
      -- encoding them registers each one (for shared references) on the
      -- job's heap, which does not.
      local function build(count_only)
        return function()
          local base = collectgarbage("count")
          local t = {}
          while (collectgarbage("count") - base) * 1024 < 2.4e6 do t[#t + 1] = {} end
          if count_only then return #t end
          return t
        end
      end
      local r = resolve(pool, build(true), { max_heap_bytes = 4e6 })
      assert.is_true(r[1], tostring(r[2]))
      assert(r[2] > 10000)
      local err = expect_failure(resolve(pool, build(false), { max_heap_bytes = 4e6 }), "OOM")
      assert.are.equal("Process tried to use more than 4000000 bytes of memory", err.message)
    end)

    it_rlimit_data("malloc of 4 GB through the FFI returns NULL (a process-level limit)", function()
      local r = resolve(pool, function()
        local f = require("ffi")
        f.cdef "void *malloc(size_t n);"
        return f.C.malloc(4e9) == nil
      end)
      assert.is_true(r[1], tostring(r[2]))
      assert.is_true(r[2])
    end)

    it_rlimit_data("malloc + memset of 100 MB chunks stops well below a gigabyte", function()
      local rss = rss_kb()
      local r = resolve(pool, function()
        local f = require("ffi")
        f.cdef "void *malloc(size_t n); void *memset(void *p, int c, size_t n);"
        local got = 0
        for _ = 1, 40 do
          local p = f.C.malloc(100 * 2^20)
          if p == nil then break end
          f.C.memset(p, 1, 100 * 2^20)
          got = got + 100
        end
        return got
      end, { max_ms = 20000 })
      assert.is_true(r[1], tostring(r[2]))
      assert(r[2] < 1024, "the job got " .. tostring(r[2]) .. " MB")
      assert(rss_kb() - rss < 50 * 1024, "the host's RSS grew")
    end)

    it_rlimit_data("malloc + memset of gigabytes without checking ends as OOM or a crash", function()
      local rss = rss_kb()
      local err = expect_failure(resolve(pool, function()
        local f = require("ffi")
        f.cdef "void *malloc(size_t n); void *memset(void *p, int c, size_t n);"
        for _ = 1, 8 do
          f.C.memset(f.C.malloc(2^30), 1, 2^30)
        end
        return "filled 8 GB"
      end, { max_ms = 20000 }))
      assert(err.type == "OOM" or (err.type == "ProcessExit" and err.reason == "SIGSEGV"),
        "got " .. tostring(err.type) .. ": " .. tostring(err.message))
      assert(rss_kb() - rss < 50 * 1024, "the host's RSS grew")
    end)

    it("a max_heap_bytes too small to run anything gives a clear error", function()
      local err = expect_failure(resolve(pool, function() return 1 end,
        { max_heap_bytes = 1 }), "OOM")
      assert.are.equal("Process tried to use more than 1 bytes of memory", err.message)
      local big = ("x"):rep(100000)
      err = expect_failure(resolve(pool, function() return #big end,
        { max_heap_bytes = 1000 }), "OOM")
      assert.are.equal("Process tried to use more than 1000 bytes of memory", err.message)
    end)
  end)

  -------------------------------------------------------------------------
  describe("crashes and exits", function()
    -- Each ends its worker as a ProcessExit whose reason is `reason`, or a
    -- string matching `matches`.
    local crashes = {
      { "a segfault", H.job_bodies().segv, reason = "SIGSEGV" },
      { "abort()", function()
        local f = require("ffi")
        f.cdef "void abort(void);"
        f.C.abort()
      end, reason = "SIGABRT" },
      { "os.exit(0) before replying is a failure, not a result", function() os.exit(0) end,
        reason = "exit 0" },
      { "a stack overflow by deep recursion is reported as one", function()
        local function f(n) return 1 + f(n + 1) end
        return f(1)
      end, { max_heap_bytes = 64 * 2^20 }, matches = "stack overflow" },
    }
    for _, case in ipairs(crashes) do
      it(case[1], function()
        local err = expect_failure(resolve(pool, case[2], case[3]), "ProcessExit")
        if case.reason then
          assert.are.equal(case.reason, err.reason)
        else
          assert.are.equal("string", type(err.reason))
          assert.matches(case.matches, err.reason)
        end
      end)
    end
  end)

  -------------------------------------------------------------------------
  describe("the process tree: nothing a job started survives", function()
    -- Jobs that leave processes behind. `job(mark, started, pidfile)` makes
    -- the job; `env` runs it tagged, `max_ms` sets its limit; `check(r)`
    -- checks what it returned; `what` names it in the report of how long
    -- until nothing was left (checked against the pid file with `pids`).
    local function child_started(r)
      assert.is_true(r[1], tostring(r[2]))
      assert.is_true(r[2], "the job's child did not start")
    end
    local function timed_out(r)
      expect_failure(r, "Timeout")
    end
    local leavers = {
      { "a background child of os.execute, the job returning", what = "os.execute('sleep &')",
        env = true, check = child_started, job = function(m, started)
          return function() return start_sleeper("", m, started) end
        end },
      { "a background child of os.execute, the job timing out",
        what = "os.execute('sleep &') then timeout", env = true, max_ms = 300, check = timed_out,
        job = function(m)
          return function()
            os.execute("sleep " .. m .. " >/dev/null 2>&1 &")
            while true do end
          end
        end },
      { "a child that calls setsid to slip out of the worker's group", what = "setsid sleep &",
        env = true, check = child_started, job = function(m, started)
          return function() return start_sleeper("setsid ", m, started) end
        end },
      { "a setsid child of a job that is killed at max_ms", what = "setsid sleep & then timeout",
        env = true, max_ms = 300, check = timed_out, job = function(m)
          return function()
            os.execute("setsid sleep " .. m .. " >/dev/null 2>&1 &")
            while true do end
          end
        end },
      { "an io.popen child the job leaves open", what = "io.popen left open", env = true,
        check = child_started, job = function(m, started)
          return function()
            local p = io.popen("touch " .. started .. "; exec sleep " .. m)
            for _ = 1, 200 do
              local f = io.open(started)
              if f then
                f:close()
                return p ~= nil
              end
              os.execute("sleep 0.01")
            end
            return false
          end
        end },
      { "50 children made with FFI fork", what = "50 FFI fork children", pids = true,
        check = function(r)
          assert.is_true(r[1], tostring(r[2]))
          assert.are.equal(50, r[2])
          assert.are.equal(50, #recorded(pidfile))
        end, job = function(_, _, path)
          return function()
            local f = require("ffi")
            f.cdef "int fork(void); unsigned int sleep(unsigned int s);"
            local n = 0
            for _ = 1, 50 do
              local pid = f.C.fork()
              if pid == 0 then
                while true do f.C.sleep(1000) end
              end
              if pid > 0 then
                n = n + 1
                note_pid(path, pid)
              end
            end
            return n
          end
        end },
      -- 10 children each fork 5 grandchildren and exit, so the grandchildren
      -- are orphans; every other one calls setsid.
      { "a bounded fork bomb of orphans, some in their own sessions",
        what = "fork bomb of 50 orphans", pids = true, max_ms = 20000, check = function(r)
          assert.is_true(r[1], tostring(r[2]))
          assert.are.equal(50, #recorded(pidfile))
        end, job = function(_, _, path)
          return function()
            local f = require("ffi")
            f.cdef [[int fork(void); int setsid(void); unsigned int sleep(unsigned int s);
              void _exit(int code); int waitpid(int pid, int *st, int opt);]]
            for i = 1, 10 do
              local pid = f.C.fork()
              if pid == 0 then
                for k = 1, 5 do
                  local g = f.C.fork()
                  if g == 0 then
                    if k % 2 == 0 then f.C.setsid() end
                    while true do f.C.sleep(1000) end
                  end
                  if g > 0 then note_pid(path, g) end
                end
                f.C._exit(0)
              end
              if pid > 0 then f.C.waitpid(pid, nil, 0) end
            end
            return #io.open(path):read("*a")
          end
        end },
    }
    for _, case in ipairs(leavers) do
      it(case[1], function()
        local opts
        if case.env or case.max_ms then
          opts = { max_ms = case.max_ms }
          if case.env then opts.env = { HANDLER_TEST_TAG = tag } end
        end
        local r = resolve(pool, case.job(mark, dir .. "/started", pidfile), opts)
        local t0 = H.now()
        case.check(r)
        assert_nothing_survives(case.what, mark, tag, case.pids and pidfile or nil, t0)
      end)
    end

    it("another worker's death does not kill a running job's setsid child", function()
      -- The supervisor sweeps away the orphans a dead worker's job left; the
      -- orphans of a job still running are not its to kill.
      local m, path, ready, go = mark, pidfile, dir .. "/ready", dir .. "/go"
      local started = dir .. "/started"
      local job = pool:async(function()
        if not start_sleeper("setsid ", m, started) then return "the child did not start" end
        local child
        local p = io.popen("ps -eo pid,args")
        for line in p:lines() do
          local pid, args = line:match("^%s*(%d+) (.*)$")
          if pid and args:find("^sleep " .. m:gsub("%.", "%%.")) then child = tonumber(pid) end
        end
        p:close()
        if child == nil then return "the child was killed while its job was running" end
        note_pid(path, child)
        io.open(ready, "w"):close()
        for _ = 1, 1000 do
          local f = io.open(go)
          if f then
            f:close()
            break
          end
          os.execute("sleep 0.01")
        end
        return "done"
      end, { env = { HANDLER_TEST_TAG = tag }, max_ms = 30000 })
      assert.is_truthy(job)
      assert.is_true(H.wait_until(function() return exists(ready) or job:done() end, 10),
        "the job never started")
      if not exists(ready) then
        local _, why = job:await()
        error(tostring(why))
      end
      local child = recorded(pidfile)[1].pid
      local ok, err = pool:run(function() os.exit(1) end)
      assert.is_false(ok)
      assert.are.equal("exit 1", err.reason)
      -- The sweep lasts about a second after a death: watch for two.
      local killed = H.wait_until(function() return not live(child) end, 2)
      H.write_file(go, "")
      local jok, v = job:await()
      assert.is_true(jok, tostring(v))
      assert.are.equal("done", v)
      assert.is_false(killed, "the running job's child was killed when another worker died")
      assert_nothing_survives("setsid child after its job ended", mark, tag, pidfile, H.now())
    end)

    it("a job that clears its death signal, then the supervisor is killed", function()
      local m, path, ready = mark, pidfile, dir .. "/ready"
      local job = pool:async(function()
        local f = require("ffi")
        f.cdef "int prctl(int op, unsigned long a, unsigned long b, unsigned long c, unsigned long d);"
        f.C.prctl(1, 0, 0, 0, 0) -- PR_SET_PDEATHSIG, 0
        note_pid(path, my_pid())
        os.execute("sleep " .. m .. " >/dev/null 2>&1 &")
        io.open(ready, "w"):close()
        while true do end
      end, { env = { HANDLER_TEST_TAG = tag }, max_ms = 30000 })
      assert.is_truthy(job)
      assert.is_true(H.wait_until(function() return exists(ready) end, 10), "the job never started")
      local _, sup = H.workers()
      local t0 = H.now()
      assert.is_true(H.kill9(sup))
      local ok, err = job:await()
      assert.is_false(ok)
      assert.are.equal("ProcessExit", err.type)
      assert.is_true(job:done())
      assert_nothing_survives("PDEATHSIG cleared, supervisor killed", mark, tag, pidfile, t0)
    end)

    it("the host removes the private directories of a supervisor that was killed", function()
      local ready = dir .. "/ready"
      local job = pool:async(function()
        local p = io.popen("pwd")
        local d = p:read("*l")
        p:close()
        local f = io.open(ready, "w")
        f:write(d)
        f:close()
        while true do end
      end, { max_ms = 30000 })
      assert.is_true(H.wait_until(function() return exists(ready) end, 10), "the job never started")
      local cwd = read_file(ready)
      local _, sup = H.workers()
      assert.matches("^" .. TMP:gsub("%p", "%%%0") .. "/handler%-" .. sup .. "%-", cwd)
      assert.is_true(exists(cwd))
      assert.is_true(H.kill9(sup))
      local ok = job:await()
      assert.is_false(ok)
      assert.is_true(H.wait_until(function() return not exists(cwd) end, 5),
        cwd .. " is still there")
    end)

    it("a host killed with SIGKILL takes everything its jobs started with it", function()
      -- The host runs with HANDLER_TEST_TAG set from the start, and the jobs
      -- pass it to the programs they run, which carry it in
      -- /proc/<pid>/environ. The supervisor clears the host's environment
      -- from its memory (SECURITY.md), so it, the workers and what they
      -- fork without running a program do not: once every job is ready,
      -- the host writes down every process under it (pid and start time).
      local script = [[
        local handler = require("handler")
        local ffi = require("ffi")
        ffi.cdef [=[int poll(void *fds, unsigned long n, int ms); int getpid(void);
          typedef struct { uint64_t ino; int64_t off; unsigned short reclen; unsigned char type;
            char name[256]; } hd_de;
          void *opendir(const char *p); hd_de *readdir(void *d); int closedir(void *d);]=]
        local mark, dir = arg[1], arg[2]
        -- "pid start" of every descendant of this host, into path.
        local function record_tree(path)
          local info, out, me = {}, {}, ffi.C.getpid()
          local d = ffi.C.opendir("/proc")
          while true do
            local e = ffi.C.readdir(d)
            if e == nil then break end
            local pid = tonumber(ffi.string(e.name))
            local f = pid and io.open("/proc/" .. pid .. "/stat")
            if f then
              local ppid, rest = (f:read("*a") or ""):match("^.*%) %S (%d+) (.*)$")
              f:close()
              if ppid then
                info[pid] = { ppid = tonumber(ppid),
                  start = rest:match("^" .. ("%S+ "):rep(17) .. "(%d+)") }
              end
            end
          end
          ffi.C.closedir(d)
          for pid, i in pairs(info) do
            local p, n = i.ppid, 0
            while p and p > 1 and p ~= me and n < 64 do
              p = info[p] and info[p].ppid
              n = n + 1
            end
            if p == me then out[#out + 1] = pid .. " " .. i.start end
          end
          local f = io.open(path, "w")
          f:write(table.concat(out, "\n"), "\n")
          f:close()
        end
        local recorded = false
        local pool = handler.pool{}
        local opts = { env = { "HANDLER_TEST_TAG" }, max_ms = 60000 }
        local function ready(name) io.open(dir .. "/ready-" .. name, "w"):close() end
        local jobs = {}
        jobs[1] = pool:async(function()
          os.execute("sleep " .. mark .. " >/dev/null 2>&1 &") ready(1) while true do end
        end, opts)
        jobs[2] = pool:async(function()
          os.execute("setsid sleep " .. mark .. " >/dev/null 2>&1 &") ready(2) while true do end
        end, opts)
        jobs[3] = pool:async(function()
          local p = io.popen("sleep " .. mark) ready(3) return p:read("*a")
        end, opts)
        jobs[4] = pool:async(function()
          local f = require("ffi")
          f.cdef "int fork(void); int setsid(void); unsigned int sleep(unsigned int s);"
          for i = 1, 50 do
            if f.C.fork() == 0 then
              if i % 2 == 0 then f.C.setsid() end
              while true do f.C.sleep(1000) end
            end
          end
          ready(4) while true do end
        end, opts)
        jobs[5] = pool:async(function()
          local f = require("ffi")
          f.cdef "int prctl(int op, unsigned long a, unsigned long b, unsigned long c, unsigned long d);"
          f.C.prctl(1, 0, 0, 0, 0)
          os.execute("sleep " .. mark .. " >/dev/null 2>&1 &")
          ready(5) while true do end
        end, opts)
        while true do
          handler.step()
          ffi.C.poll(nil, 0, 10)
          local all = true
          for i = 1, #jobs do
            local f = io.open(dir .. "/ready-" .. i)
            if f then f:close() else all = false end
          end
          if all and not recorded then
            record_tree(dir .. "/pids")
            recorded = true
            io.open(dir .. "/ready", "w"):close()
          end
        end
      ]]
      local host = spawn_host(dir, script, "HANDLER_TEST_TAG=" .. tag, mark, dir)
      local hstart = select(3, stat(host))
      finally(function()
        local _, _, start = stat(host)
        if start == hstart and live(host) then C.hd_hard_kill(host, 9) end
      end)
      assert.is_true(H.wait_until(function() return exists(dir .. "/ready") end, 20),
        "the host's jobs never became ready: " .. (read_file(dir .. "/err") or ""))
      local before = #strays(mark, tag, dir .. "/pids")
      -- host, supervisor, 5 workers, 50 forks, 4 sleeps (and their shells)
      assert(before >= 60, "only " .. before .. " tagged processes")
      local t0 = H.now()
      assert.is_true(H.kill9(host))
      assert_nothing_survives("host killed with SIGKILL", mark, tag, dir .. "/pids", t0)
    end)
  end)

  -------------------------------------------------------------------------
  describe("what a job can see", function()
    it("only fds 0-4, not the host's listening socket or open files", function()
      local sock = C.hd_hard_socket(2, 1, 0)
      assert(sock >= 0)
      assert.are.equal(0, C.hd_hard_listen(sock, 5))
      local file = open("/proc/self/status")
      finally(function()
        C.hd_hard_close(sock)
        file:close()
      end)
      -- A new supervisor, started while the host holds them (neither is
      -- close-on-exec), so the next job runs in a worker that could see them.
      local _, old = H.workers()
      assert.is_true(H.kill9(old))
      assert.is_true(H.wait_until(function() return select(2, H.workers()) ~= old end, 5))
      local r = resolve(pool, H.job_bodies().fds)
      assert.is_true(r[1], tostring(r[2]))
      assert.are.equal("0,1,2,3,4", r[2])
    end)

    it("no host fds in a worker of a host that opened them before its first job", function()
      local script = [[
        local ffi = require("ffi")
        ffi.cdef "int socket(int d, int t, int p); int listen(int fd, int n);"
        local sock = ffi.C.socket(2, 1, 0)
        ffi.C.listen(sock, 5)
        local keep = io.open("/proc/self/status")
        local handler = require("handler")
        local ok, fds = handler.run(]] .. H.FDS_JOB_SOURCE .. [[)
        local res = io.open("res", "w")
        res:write(tostring(ok), " ", tostring(fds), " host:", sock, "\n")
        res:close()
      ]]
      local res = run_host(dir, script)
      assert.matches("^true 0,1,2,3,4 host:%d+\n$", res)
    end)

    it("no host environment by default; the env option passes names and values", function()
      C.hd_hard_setenv("HANDLER_TEST_SECRET", "s3cret", 1)
      finally(function() C.hd_hard_unsetenv("HANDLER_TEST_SECRET") end)
      local r = resolve(pool, function()
        return os.getenv("HANDLER_TEST_SECRET"), os.getenv("PATH"), os.getenv("HOME")
      end)
      assert.is_true(r[1])
      assert.are.same({ n = 4, true, nil, nil, nil }, r)
      r = resolve(pool, function()
        local p = io.popen("env")
        local env = p:read("*a")
        p:close()
        return os.getenv("HANDLER_TEST_SECRET"), os.getenv("EXTRA"), os.getenv("HANDLER_UNSET_VAR"),
          env
      end, { env = { "HANDLER_TEST_SECRET", "HANDLER_UNSET_VAR", EXTRA = "v" } })
      assert.is_true(r[1], tostring(r[2]))
      assert.are.equal("s3cret", r[2])
      assert.are.equal("v", r[3])
      assert.is_nil(r[4])
      -- A program the job runs sees the same: the two variables (and what
      -- the shell itself sets), nothing of the host's.
      assert.matches("HANDLER_TEST_SECRET=s3cret\n", r[5])
      assert.matches("EXTRA=v\n", r[5])
      assert.is_nil(r[5]:find("HOME=", 1, true))
      -- The next job in the same worker does not inherit them.
      local one = handler.pool({ max_workers = 1 })
      finally(function() one:close() end)
      assert.is_true(one:run(function() end))
      local started = one:stats().processes_started
      local ok, a = one:run(function() return os.getenv("EXTRA") end, { env = { EXTRA = "v" } })
      assert.is_true(ok)
      assert.are.equal("v", a)
      local ok2, b = one:run(function() return os.getenv("EXTRA") end)
      assert.is_true(ok2)
      assert.is_nil(b)
      assert.are.equal(started, one:stats().processes_started)
    end)

    it("a private working directory, removed with its worker", function()
      local r = resolve(pool, function()
        local p = io.popen("pwd; stat -c %a .")
        local d, mode = p:read("*l"), p:read("*l")
        p:close()
        io.open("left-behind.txt", "w"):write("x")
        return d, mode
      end)
      assert.is_true(r[1], tostring(r[2]))
      local cwd, mode = r[2], r[3]
      local _, sup = H.workers()
      assert.matches("^" .. TMP:gsub("%p", "%%%0") .. "/handler%-" .. sup .. "%-", cwd)
      assert.are.equal("700", mode)
      -- The job used io, so its worker ends; its directory goes with it.
      assert.is_true(H.wait_until(function() return not exists(cwd) end, 5),
        cwd .. " is still there")
      -- Two workers at once have two directories.
      local function pwd()
        local p = io.popen("pwd; sleep 0.3")
        local d = p:read("*l")
        p:close()
        return d
      end
      local a = pool:async(pwd)
      local b = pool:async(pwd)
      local _, da = a:await()
      local _, db = b:await()
      assert.is_string(da)
      assert.is_string(db)
      assert.are_not.equal(da, db)
    end)

    it("no core files and a bounded file size", function()
      local r = resolve(pool, H.job_bodies().rlimits({ 4, 1 })) -- RLIMIT_CORE, RLIMIT_FSIZE
      assert.is_true(r[1], tostring(r[2]))
      assert.are.equal(0, r[2])
      assert.are.equal(0, r[3])
      assert.are.equal(2^30, r[4])
      assert.are.equal(2^30, r[5])
    end)
  end)

  -------------------------------------------------------------------------
  describe("output", function()
    it("a job writing 100 MB to stdout or stderr stops at max_output_bytes", function()
      local script = [[
        local handler = require("handler")
        local res = io.open("res", "w")
        local function size(path)
          local f = io.open(path, "rb") local n = f:seek("end") f:close() return n
        end
        local function report(name, ok, v)
          io.stdout:flush() io.stderr:flush()
          res:write(name, "\t", tostring(ok), "\t", type(v) == "table" and v.type or "-", "\t",
            type(v) == "table" and tostring(v.reason) or tostring(v), "\t", size("out"), "\t",
            size("err"), "\n")
        end
        local line = ("x"):rep(1023) .. "\n"
        report("io.write", handler.run(function()
          for _ = 1, 100 * 1024 do io.write(line) end return "done"
        end, { max_ms = 30000 }))
        report("print", handler.run(function()
          for _ = 1, 100 * 1024 do print(line) end return "done"
        end, { max_ms = 30000, max_output_bytes = 1e6 }))
        report("pcall", handler.run(function()
          local n = 0
          for _ = 1, 100 * 1024 do
            if pcall(io.stdout.write, io.stdout, line) then n = n + 1 end
          end
          return n
        end, { max_ms = 30000, max_output_bytes = 1e6 }))
        report("stderr", handler.run(function()
          for _ = 1, 100 * 1024 do io.stderr:write(line) end return "done"
        end, { max_ms = 30000, max_output_bytes = 2e6 }))
        report("after", handler.run(function() return 1 + 1 end))
        res:close()
      ]]
      local res = run_host(dir, script)
      local rows = {}
      for name, ok, kind, reason, out, err in
        res:gmatch("(%S+)\t(%S+)\t(%S+)\t([^\t]*)\t(%d+)\t(%d+)\n") do
        rows[name] = { ok = ok, kind = kind, reason = reason, out = tonumber(out),
          err = tonumber(err) }
      end
      local limit = 16 * 2^20
      assert.is_table(rows["io.write"], res)
      local w = rows["io.write"]
      assert.are.equal("false", w.ok)
      assert.are.equal("ProcessExit", w.kind)
      assert.are.equal("output limit", w.reason)
      assert(w.out <= limit, "stdout got " .. w.out .. " bytes")
      local p = rows.print
      assert.are.equal("false", p.ok)
      assert.are.equal("output limit", p.reason)
      assert(p.out - w.out <= 1e6, "print wrote " .. (p.out - w.out))
      -- The limit is the host's, at the descriptor: no error to catch, the
      -- worker is killed.
      local c = rows.pcall
      assert.are.equal("false", c.ok)
      assert.are.equal("ProcessExit", c.kind)
      assert.are.equal("output limit", c.reason)
      assert(c.out - p.out <= 1e6, "pcall'd writes wrote " .. (c.out - p.out))
      local e = rows.stderr
      assert.are.equal("false", e.ok)
      assert.are.equal("output limit", e.reason)
      assert(e.err <= 2e6, "stderr got " .. e.err .. " bytes")
      assert.are.equal("true", rows.after.ok)
      assert.are.equal("2", rows.after.reason)
      assert.are.equal(c.out, H.file_size(dir .. "/out"))
    end)
  end)

  -------------------------------------------------------------------------
  describe("max_result_bytes", function()
    -- 100 MB in 1000-byte blocks, each numbered, so a lost, doubled or
    -- shifted block shows.
    local function big()
      local parts = {}
      for i = 1, 100000 do
        parts[i] = string.format("%08d", i) .. string.rep(string.char(65 + i % 26), 992)
      end
      return table.concat(parts)
    end

    it("a 100 MB result within the bound comes back intact", function()
      local r = resolve(pool, big, { max_heap_bytes = 400 * 2^20,
        max_result_bytes = 200 * 2^20, max_ms = 60000 })
      assert.is_true(r[1], tostring(r[2]))
      assert.are.equal(100000000, #r[2])
      assert.is_true(r[2] == big(), "the result differs from what the job built")
      r = nil
      collectgarbage()
    end)

    it("a result over max_result_bytes is refused, naming the option", function()
      local err = expect_failure(resolve(pool, function() return ("y"):rep(1e6) end,
        { max_result_bytes = 1e5 }), "ProcessExit")
      assert.matches("max_result_bytes", err.reason, 1, true)
    end)
  end)

  -------------------------------------------------------------------------
  describe("isolation between jobs in one worker", function()
    local one
    before_each(function()
      one = handler.pool({ max_workers = 1 })
      assert.is_true((one:run(function() end)))
    end)
    after_each(function()
      H.assert_clean(snap, { pool, one })
      one:close()
    end)

    -- Runs `dirty` then `check` in the same worker process; returns what
    -- check returned.
    local function after(dirty)
      local started = one:stats().processes_started
      local r = resolve(one, dirty)
      assert.is_true(r[1], tostring(r[2]))
      local c = resolve(one, function()
        local n = 0
        for i = 1, 3e6 do n = n + i % 3 end -- long enough for a count hook
        return rawget(_G, "leaked"), ("abc"):upper(), ("x").foo, jit.status(),
          getmetatable(_G), collectgarbage("count") < 1e5, n
      end)
      assert.are.equal(started, one:stats().processes_started, "the worker was replaced")
      return c
    end

    local function assert_pristine(c)
      assert.is_true(c[1], tostring(c[2]))
      assert.is_nil(c[2])
      assert.are.equal("ABC", c[3])
      assert.is_nil(c[4])
      assert.is_true(c[5])
      assert.is_nil(c[6])
    end

    it("a global a job set", function()
      assert_pristine(after(function() leaked = "yes" end))
    end)

    it("the string metatable a job changed", function()
      assert_pristine(after(function()
        getmetatable("").__index = function() return "hacked" end
        string.upper = function() return "hacked" end
      end))
    end)

    it("a debug hook a job set", function()
      assert_pristine(after(function()
        debug.sethook(function() error("hooked") end, "", 1e6)
      end))
    end)

    it("jit.off() and a metatable on _G", function()
      assert_pristine(after(function()
        jit.off()
        setmetatable(_G, { __index = function() return "hacked" end })
      end))
    end)

    it("a job that used the FFI gets a fresh process afterwards", function()
      local started = one:stats().processes_started
      local ok = one:run(function()
        local f = require("ffi")
        f.cdef "int getpid(void);"
        return f.C.getpid()
      end)
      assert.is_true(ok)
      assert.is_true(one:run(function() return 1 end))
      assert.are.equal(started + 1, one:stats().processes_started)
    end)
  end)
end)
