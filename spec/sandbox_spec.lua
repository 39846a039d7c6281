-- sandbox_spec.lua: the sandbox option. The "strict" profile
-- (sandbox = true) strips the Lua environment (no FFI, no C modules, no
-- bytecode, io and os cut down to what cannot escape) on top of the seccomp
-- filter; the "syscalls" profile keeps Lua whole and applies only the filter
-- and tight limits, so a forbidden system call ends the job as a
-- SandboxViolation. After every test: the host is responsive, no fd and no
-- process leaked, every pool is back to running == 0 and
-- bytes_committed == 0, and jobs resolved exactly once.
local handler = require("handler")
local H = require("spec.support.helpers")

local format, concat, tostring, tonumber, ipairs, type, select, pcall =
  string.format, table.concat, tostring, tonumber, ipairs, type, select, pcall
local open = io.open

local pack, read_file, exists = H.pack, H.read_file, H.exists

-- The error a call raised, as a string.
local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error to be raised")
  return tostring(err)
end

-- Children of the supervisor that are not workers handler knows about
-- (not zombies): what a job left behind.
local function strays()
  local workers, sup = H.workers()
  local out = {}
  if sup == nil then return out end
  for _, c in ipairs(H.children(sup)) do
    if c.state ~= "Z" and c.state ~= "X" and not H.contains(workers, c.pid) then
      out[#out + 1] = tostring(c.pid)
    end
  end
  return out
end

-- Jobs resolve exactly once (H.resolve).
local resolve, failure = H.resolve, H.expect_failure

local function ok_values(r)
  assert.is_true(r[1], tostring(r[2]))
  return select(2, unpack(r, 1, r.n))
end

local function violation(r)
  local err = failure(r, "SandboxViolation")
  assert.are.equal("Process made a forbidden system call", err.message)
  assert.are.equal("SIGSYS", err.reason)
  assert.are.equal("Process made a forbidden system call", tostring(err))
  return err
end

-- The "Seccomp:" and "NoNewPrivs:" lines of a process's status.
local function seccomp_of(pid)
  local s = read_file("/proc/" .. pid .. "/status") or ""
  return tonumber(s:match("Seccomp:%s*(%d+)")), tonumber(s:match("NoNewPrivs:%s*(%d+)"))
end

-- Runs fn in pool and returns the pid of the worker process it ran in (the
-- one worker that appeared for it), found from the host side.
local function worker_of(pool, fn)
  local before = H.workers()
  local r = resolve(pool, fn)
  assert.is_true(r[1], tostring(r[2]))
  local new = {}
  for _, pid in ipairs(H.workers()) do
    if not H.contains(before, pid) then new[#new + 1] = pid end
  end
  assert.are.equal(1, #new, "expected one new worker")
  return new[1]
end

describe("the sandbox", function()
  local strict, syscalls, snap, dir

  setup(function()
    H.warm()
    strict = handler.pool({ sandbox = true })
    syscalls = handler.pool({ sandbox = "syscalls" })
  end)

  teardown(function()
    strict:close()
    syscalls:close()
  end)

  before_each(function()
    dir = H.tmpdir()
    snap = H.snapshot()
  end)

  after_each(function()
    -- The pools handler.run uses for sandboxed jobs are checked by the tests
    -- that use them; running them here too would leave their idle workers
    -- to expire in the middle of later spec files.
    local checks = {
      pack(strict:run(function() return 1 + 1 end)),
      pack(syscalls:run(function() return 1 + 1 end)),
      pack(handler.run(function() return 1 + 1 end)),
    }
    local left
    H.wait_until(function()
      left = strays()
      return #left == 0
    end, 5)
    H.rm_r(dir)
    for _, r in ipairs(checks) do
      assert.is_true(r[1], tostring(r[2]))
      assert.are.equal(2, r[2])
    end
    assert.are.equal(0, #left, "left behind: " .. concat(left, ", "))
    H.assert_clean(snap, { strict, syscalls, handler.default_pool(true),
      handler.default_pool("syscalls") })
  end)

  -------------------------------------------------------------------------
  describe("strict (sandbox = true)", function()
    it("runs plain jobs: results, shared tables, string functions", function()
      local t = { 1, 2, { x = "y" } }
      t[4] = t
      local r = resolve(strict, function()
        local out = {}
        for i = 1, #t - 1 do out[i] = t[i] end
        return ("%d-%s"):format(#out, t[3].x), t[4] == t, nil, math.floor(7.5), os.time() > 0
      end)
      assert.are.same({ n = 6, true, "3-y", true, nil, 7, true }, r)
      local ok, a, b = handler.run(function(...) return "a", string.rep("b", 3) end,
        { sandbox = true })
      assert.is_true(ok)
      assert.are.equal("a", a)
      assert.are.equal("bbb", b)
    end)

    it("reports a raised error", function()
      local err = failure(resolve(strict, function() error("boom", 0) end), "ProcessExit")
      assert.are.equal("boom", err.reason)
      assert.are.equal("Process exited with boom", err.message)
      local ok, e = handler.run(function() error({ code = 7 }) end, { sandbox = true })
      assert.is_false(ok)
      assert.are.equal(7, e.reason.code)
    end)

    it("times out", function()
      local t0 = H.now()
      local err = failure(resolve(strict, function() while true do end end, { max_ms = 200 }),
        "Timeout")
      assert.are.equal("Took more than 200ms to complete", err.message)
      H.assert_ended_by(H.now() - t0, 200)
    end)

    it("ends a growing heap as OOM, pcall or not", function()
      local err = failure(resolve(strict, function()
        local t = {}
        for _ = 1, 20 do
          pcall(function() while true do t[#t + 1] = {} end end)
        end
        return #t
      end, { max_heap_bytes = 4e6 }), "OOM")
      assert.are.equal("Process tried to use more than 4000000 bytes of memory", err.message)
    end)

    it("has no FFI, no jit, no C modules and no package.loadlib", function()
      local r = resolve(strict, function()
        local out = {}
        out.ffi_loaded = package.loaded.ffi ~= nil
        out.ffi_preload = package.preload.ffi ~= nil
        out.ffi_require = (pcall(require, "ffi"))
        out.jit = rawget(_G, "jit") ~= nil
        out.jit_loaded = package.loaded.jit ~= nil or package.loaded["jit.util"] ~= nil
          or package.loaded["jit.opt"] ~= nil
        out.jit_require = (pcall(require, "jit")) or (pcall(require, "jit.util"))
          or (pcall(require, "jit.profile"))
        out.loadlib = package.loadlib ~= nil
        out.c_loaders = package.loaders[3] ~= nil or package.loaders[4] ~= nil
        out.c_module = (pcall(require, "cjson")) or (pcall(require, "handler.core"))
        return out
      end)
      local out = ok_values(r)
      for k, v in pairs(out) do
        assert.is_false(v, k .. " is reachable")
      end
    end)

    it("has no io or os escape hatches, no loadfile, dofile or debug.getregistry", function()
      local r = resolve(strict, function()
        local function keys(t)
          local k = {}
          for name in pairs(t) do k[#k + 1] = name end
          table.sort(k)
          return table.concat(k, ",")
        end
        return keys(io), keys(os), keys(debug), rawget(_G, "loadfile") == nil,
          rawget(_G, "dofile") == nil, debug.getregistry == nil
      end)
      local io_keys, os_keys, debug_keys, no_loadfile, no_dofile, no_registry = ok_values(r)
      assert.are.equal("write", io_keys)
      assert.are.equal("clock,date,difftime,getenv,time", os_keys)
      assert.are.equal("traceback", debug_keys)
      assert.is_true(no_loadfile)
      assert.is_true(no_dofile)
      assert.is_true(no_registry)
    end)

    it("refuses to load bytecode and loads text", function()
      local r = resolve(strict, function()
        local bc = string.dump(function() return 42 end)
        local f1, e1 = load(bc)
        local f2, e2 = loadstring(bc)
        local done = false
        local f3, e3 = load(function()
          if done then return nil end
          done = true
          return bc
        end)
        local f4, e4 = load(bc, "=x", "b")
        local text = load("return 6 * 7")
        local text2 = loadstring("return 'ok'")
        return f1 == nil and f2 == nil and f3 == nil and f4 == nil, e1, e2, e3, e4, text(), text2()
      end)
      local refused, e1, e2, e3, e4, v, v2 = ok_values(r)
      assert.is_true(refused)
      for _, e in ipairs({ e1, e2, e3, e4 }) do
        assert.matches("mode", e)
      end
      assert.are.equal(42, v)
      assert.are.equal("ok", v2)
    end)

    it("a closure capturing io.open fails with an error naming it", function()
      local io_open, execute = io.open, os.execute
      local err = failure(resolve(strict, function() return io_open("/etc/passwd") end),
        "ProcessExit")
      assert.matches('"io"."open"', err.reason, 1, true)
      err = failure(resolve(strict, function() return execute("true") end), "ProcessExit")
      assert.matches('"os"."execute"', err.reason, 1, true)
    end)

    it("keeps one job's changes from the next job in the same worker", function()
      local one = handler.pool({ sandbox = true, max_workers = 1 })
      finally(function() one:close() end)
      assert.is_true((one:run(function() end)))
      local started = one:stats().processes_started
      assert.is_true((one:run(function()
        leaked = 1
        string.rep = nil
        getmetatable("").__index = {}
      end)))
      local ok, g, rep, up = one:run(function()
        return rawget(_G, "leaked"), string.rep("a", 2), ("a"):upper()
      end)
      assert.is_true(ok, tostring(g))
      assert.is_nil(g)
      assert.are.equal("aa", rep)
      assert.are.equal("A", up)
      assert.are.equal(started, one:stats().processes_started)
      H.assert_clean(snap, { strict, syscalls, one })
    end)

    it("runs its workers under a seccomp filter with no_new_privs", function()
      local one = handler.pool({ sandbox = true })
      finally(function() one:close() end)
      local pid = worker_of(one, function() return 1 end)
      local mode, nnp = seccomp_of(pid)
      assert.are.equal(2, mode)
      assert.are.equal(1, nnp)
      -- An ordinary worker has neither.
      local plain = handler.pool({})
      finally(function() plain:close() end)
      local ppid = worker_of(plain, function() return 1 end)
      assert.are.equal(0, (seccomp_of(ppid)))
    end)
  end)

  -------------------------------------------------------------------------
  describe("syscalls (seccomp and limits only)", function()
    it("os.execute is a SandboxViolation", function()
      local marker = dir .. "/ran"
      violation(resolve(syscalls, function() return os.execute("touch " .. marker) end))
      assert.is_false(exists(marker))
    end)

    it("io.popen is a SandboxViolation", function()
      violation(resolve(syscalls, function() return io.popen("echo hi"):read("*a") end))
    end)

    it("FFI fork is a SandboxViolation", function()
      violation(resolve(syscalls, function()
        local f = require("ffi")
        f.cdef "int fork(void);"
        return f.C.fork()
      end))
    end)

    it("an FFI socket is a SandboxViolation", function()
      violation(resolve(syscalls, function()
        local f = require("ffi")
        f.cdef "int socket(int d, int t, int p);"
        return f.C.socket(2, 1, 0)
      end))
    end)

    it("opening a file for writing is a SandboxViolation, and creates nothing", function()
      local path = dir .. "/written"
      violation(resolve(syscalls, function() return io.open(path, "w") end))
      assert.is_false(exists(path))
      H.write_file(path, "keep")
      violation(resolve(syscalls, function() return io.open(path, "a") end))
      violation(resolve(syscalls, function() return io.open(path, "r+") end))
      assert.are.equal("keep", read_file(path))
    end)

    it("an FFI kill of another process is a SandboxViolation", function()
      local target = H.getpid()
      violation(resolve(syscalls, function()
        local f = require("ffi")
        f.cdef "int kill(int pid, int sig);"
        return f.C.kill(target, 0)
      end))
    end)

    it("reading a file works (on the module path: the rest of the host is out of sight)", function()
      -- A sandboxed worker sees only the directories of package.path and
      -- package.cpath, read-only (spec/attack_isolation_spec.lua proves the
      -- rest is hidden); the spec's own lua/ is one of them.
      local path = (os.getenv("PWD") or ".") .. "/lua/handler/errors.lua"
      local want = H.read_file(path)
      local r = resolve(syscalls, function()
        local f = assert(io.open(path))
        local s = f:read("*a")
        f:close()
        return s
      end)
      assert.are.equal(want, (ok_values(r)))
    end)

    it("a segfault is still SIGSEGV", function()
      local err = failure(resolve(syscalls, H.job_bodies().segv), "ProcessExit")
      assert.are.equal("SIGSEGV", err.reason)
    end)

    it("sets tight limits: 16 fds, 16 MiB files, no core files", function()
      local r = resolve(syscalls, H.job_bodies().rlimits({ 7, 1, 4 })) -- NOFILE, FSIZE, CORE
      assert.are.same({ 16, 16, 16 * 2^20, 16 * 2^20, 0, 0 }, { ok_values(r) })
    end)

    it("keeps the whole Lua environment", function()
      local r = resolve(syscalls, function()
        return type(require("ffi").new), type(io.open), type(os.execute), type(loadfile),
          type(jit)
      end)
      assert.are.same({ "function", "function", "function", "function", "table" },
        { ok_values(r) })
    end)

    it("runs its workers under a seccomp filter", function()
      -- A syscalls worker serves one job and is killed after it; the pool
      -- starts a spare for the next job meanwhile. Every worker of the
      -- pool still alive is filtered, the spare included, once it has set
      -- itself up (it says hello to the host only after that; a spare
      -- may still be making its jail here).
      local one = handler.pool({ sandbox = "syscalls" })
      finally(function() one:close() end)
      local before = H.workers()
      assert.is_true(resolve(one, function() return 1 end)[1])
      local checked = 0
      for _, pid in ipairs(H.workers()) do
        local mode, nnp
        H.wait_until(function()
          mode, nnp = seccomp_of(pid)
          return mode == nil or mode == 2
        end, 5)
        if not H.contains(before, pid) and mode ~= nil then
          assert.are.equal(2, mode)
          assert.are.equal(1, nnp)
          checked = checked + 1
        end
      end
      assert.is_true(checked >= 1, "no worker of the pool to check")
    end)

    it("handler.run with sandbox = 'syscalls' reports a violation", function()
      local ok, err = handler.run(function() return os.execute("true") end,
        { sandbox = "syscalls" })
      assert.is_false(ok)
      assert.are.equal("SandboxViolation", err.type)
      assert.are.equal("SIGSYS", err.reason)
    end)
  end)

  -------------------------------------------------------------------------
  describe("configuration", function()
    it("a root pool with sandbox = true runs its and its delegates' jobs sandboxed", function()
      local root = handler.pool({ sandbox = true, name = "sandbox_spec_root" })
      local child = handler.pool({ delegate_to = root })
      local byname = handler.pool({ delegate_to = "sandbox_spec_root" })
      finally(function()
        child:close()
        byname:close()
        root:close()
      end)
      for _, p in ipairs({ root, child, byname }) do
        local ok, a, b = p:run(function() return io.open == nil, rawget(_G, "ffi") == nil end)
        assert.is_true(ok, tostring(a))
        assert.is_true(a)
        assert.is_true(b)
      end
      assert.are.equal(true, root.sandbox)
      H.assert_clean(snap, { strict, syscalls, root, child, byname })
    end)

    it("a delegating pool cannot set sandbox", function()
      local root = handler.pool({})
      finally(function() root:close() end)
      local msg = raised(handler.pool, { delegate_to = root, sandbox = true })
      assert.matches("sandbox", msg)
      msg = raised(handler.pool, { delegate_fun = function() return { root } end,
        sandbox = "syscalls" })
      assert.matches("sandbox", msg)
    end)

    it("bad sandbox values raise, naming the option", function()
      for _, bad in ipairs({ "nope", 1, {}, "STRICT" }) do
        local msg = raised(handler.run, function() end, { sandbox = bad })
        assert.matches("bad option 'sandbox'", msg, 1, true)
        msg = raised(handler.pool, { sandbox = bad })
        assert.matches("bad option 'sandbox'", msg, 1, true)
      end
      -- Pool jobs take their pool's profile: the option is not theirs.
      local msg = raised(strict.run, strict, function() end, { sandbox = true })
      assert.matches("'sandbox'", msg, 1, true)
    end)

    it("sandbox = false is an ordinary job", function()
      local ok, v = handler.run(function() return type(io.open) end, { sandbox = false })
      assert.is_true(ok)
      assert.are.equal("function", v)
    end)
  end)
end)
