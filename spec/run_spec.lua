-- run_spec.lua: handler.run as docs/API.md gives it: results, what travels with
-- the closure and what cannot, the four outcomes (a result, Timeout, OOM,
-- ProcessExit), error values, and option checking.
local handler = require("handler")
local H = require("spec.support.helpers")
local ffi = require("ffi") -- loaded in the host, so it travels by name

local run = handler.run
local select, type, tostring, tonumber, pcall, error, rawequal =
  select, type, tostring, tonumber, pcall, error, rawequal

local report_pid = H.job_bodies().report_pid
local read_number = H.read_number

-- The error a call raised, as a string.
local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error to be raised")
  return tostring(err)
end

-- Runs fn and returns its error value, asserting the call failed.
local function failure(fn, opts)
  local ok, err = run(fn, opts)
  assert.is_false(ok)
  assert.are.equal("table", type(err))
  return err
end

-- Asserts that handler.run still runs jobs: one returning v gives true, v.
local function assert_still_runs(v)
  local ok, got = run(function() return v end)
  assert.is_true(ok)
  assert.are.equal(v, got)
end

-- The started counter of the default pool: whether a call reached a worker.
local function started()
  return handler.default_pool():stats().started
end

describe("handler.run", function()
  H.leak_checked()

  describe("results", function()
    it("returns true and the result, like pcall", function()
      local ok, v = run(function() return 1 + 1 end)
      assert.is_true(ok)
      assert.are.equal(2, v)
    end)

    it("returns every result, with nils in the middle and at the end", function()
      local n = select("#", run(function() return "a", nil, 3 end))
      assert.are.equal(4, n)
      local ok, a, b, c = run(function() return "a", nil, 3 end)
      assert.is_true(ok)
      assert.are.equal("a", a)
      assert.is_nil(b)
      assert.are.equal(3, c)
      assert.are.equal(4, select("#", run(function() return 1, nil, nil end)))
    end)

    it("returns just true for a function that returns nothing", function()
      assert.are.equal(1, select("#", run(function() end)))
      assert.is_true((run(function() end)))
    end)

    it("returns many results", function()
      local r = { run(function()
        local t = {}
        for i = 1, 200 do t[i] = i * i end
        return unpack(t) -- the worker's global
      end) }
      assert.is_true(r[1])
      assert.are.equal(201, #r)
      assert.are.equal(200 * 200, r[201])
    end)
  end)

  describe("upvalues", function()
    it("carries nil and booleans", function()
      local none, yes, no = nil, true, false
      local ok, a, b, c, d = run(function()
        return none == nil, yes == true, no == false, type(no)
      end)
      assert.is_true(ok)
      assert.is_true(a)
      assert.is_true(b)
      assert.is_true(c)
      assert.are.equal("boolean", d)
    end)

    it("carries numbers exactly: NaN, -0.0, the infinities, fractions, large and small", function()
      local nan, negzero, inf, ninf = 0 / 0, -0.0, math.huge, -math.huge
      local frac, big, tiny, neg = 0.1, 2 ^ 53 + 2, 5e-324, -123456789.125
      -- Checked in the worker, so the values must have arrived, not just come back.
      -- ok, then: NaN, -0.0, inf, -inf, 0.1, 2^53 + 2, 5e-324, -123456789.125 arrived.
      assert.are.same({ true, true, true, true, true, true, true, true, true }, { run(function()
        return nan ~= nan, negzero == 0 and 1 / negzero == -math.huge, inf == math.huge,
          ninf == -math.huge, frac == 1 / 10, big == 2 ^ 53 + 2, tiny > 0 and tiny / 2 == 0,
          neg == -123456789.125
      end) })
      -- And results come back just as exact.
      local ok2, n, z, i, ni, t = run(function() return nan, negzero, inf, ninf, tiny end)
      assert.is_true(ok2)
      assert.is_true(n ~= n)
      assert.are.equal(0, z)
      assert.are.equal(-math.huge, 1 / z)
      assert.are.equal(math.huge, i)
      assert.are.equal(-math.huge, ni)
      assert.are.equal(5e-324, t)
    end)

    it("carries binary strings byte for byte", function()
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local all = table.concat(bytes)
      local zeros = "\0a\0\0b\0"
      local long = string.rep(all, 4096) -- 1 MiB
      local ok, len, first, last, back, zlen, llen = run(function()
        return #all, all:byte(1), all:byte(256), all, #zeros, #long
      end)
      assert.is_true(ok)
      assert.are.equal(256, len)
      assert.are.equal(0, first)
      assert.are.equal(255, last)
      assert.are.equal(all, back)
      assert.are.equal(6, zlen)
      assert.are.equal(2 ^ 20, llen)
      local ok2, echo = run(function() return long .. zeros end)
      assert.is_true(ok2)
      assert.are.equal(long .. zeros, echo)
    end)

    it("keeps shared references and cycles in tables", function()
      local shared = { 1, 2, 3 }
      local t = { a = shared, b = shared, list = { shared, shared } }
      t.self = t
      t.list.up = t
      -- ok, then: self, shared, list and up references hold, and #t.a.
      assert.are.same({ true, true, true, true, true, 3 }, { run(function()
        return t.self == t, t.a == t.b, t.list[1] == t.a and t.list[2] == t.a, t.list.up == t, #t.a
      end) })
      -- A result keeps its shape on the way back too.
      local ok2, back = run(function() return t end)
      assert.is_true(ok2)
      assert.are.equal(back, back.self)
      assert.are.equal(back.a, back.b)
      assert.are.equal(back, back.list.up)
      assert.are.same({ 1, 2, 3 }, back.a)
    end)

    it("carries tables keyed by tables, booleans and numbers", function()
      local k = { name = "key" }
      local t = { [k] = "tk", [true] = "b", [1.5] = "f", [-0.5] = "n", [k.name] = k }
      local ok, a, b, c, d = run(function()
        local key = t.key
        return t[key], t[true], t[1.5], t[-0.5]
      end)
      assert.is_true(ok)
      assert.are.same({ "tk", "b", "f", "n" }, { a, b, c, d })
    end)

    it("carries nested Lua functions with their own upvalues, recursively", function()
      local base = 10
      local function add(x) return x + base end
      local function twice(x) return add(add(x)) end
      local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
      local ok, a, b = run(function() return twice(1), fib(20) end)
      assert.is_true(ok)
      assert.are.equal(21, a)
      assert.are.equal(6765, b)
    end)

    it("keeps an upvalue shared between closures shared", function()
      local n = 0
      local function inc() n = n + 1 end
      local function get() return n end
      local ok, v = run(function()
        inc()
        inc()
        return get()
      end)
      assert.is_true(ok)
      assert.are.equal(2, v)
      -- The worker had its own copy: the host's n is untouched.
      assert.are.equal(0, n)
    end)

    it("sends modules and their functions by name (string.format, string, ffi, print)", function()
      local fmt, str, ffi_, pr, insert = string.format, string, ffi, print, table.insert
      local ok, s, samefmt, samestr, sameffi, sameprint, sameinsert = run(function()
        return fmt("%05d", 42), fmt == string.format, str == string, ffi_ == require("ffi"),
          pr == print, insert == table.insert
      end)
      assert.is_true(ok)
      assert.are.equal("00042", s)
      assert.is_true(samefmt)
      assert.is_true(samestr)
      assert.is_true(sameffi)
      assert.is_true(sameprint)
      assert.is_true(sameinsert)
    end)

    it("sends a base function that the host also reaches under another name", function()
      -- Compatibility shims alias base functions (table.unpack = unpack); a
      -- fresh worker state has only the base name. In a clean host, so no
      -- other module holding unpack decides which name is sent.
      local out = H.run_host([[
        table.unpack = table.unpack or unpack
        local handler = require("handler")
        local u = unpack
        print("unpack", handler.run(function() return u({ 1, 2, 3 }) end))
      ]])
      assert.matches("unpack\ttrue\t1\t2\t3\n", out, 1, true)
    end)

    it("sends module functions back by name as results", function()
      local ok, f, m = run(function() return string.format, string end)
      assert.is_true(ok)
      assert.are.equal(string.format, f)
      assert.are.equal(string, m)
    end)
  end)

  describe("a closure whose upvalue cannot travel", function()
    -- Each raises in the caller, before any job starts, naming the upvalue and its type.
    local function refused(fn)
      local before = started()
      local msg = raised(run, fn)
      assert.are.equal(before, started())
      return msg
    end

    it("raises for a userdata, naming it", function()
      local proxy = newproxy(true)
      local msg = refused(function() return proxy end)
      assert.matches("proxy", msg, 1, true)
      assert.matches("userdata", msg, 1, true)
    end)

    it("raises for a file handle that is not reachable from package.loaded", function()
      local tmp = io.tmpfile()
      local ok, msg = pcall(run, function() return tmp:read("*a") end)
      tmp:close()
      assert.is_false(ok)
      assert.matches("tmp", msg, 1, true)
      assert.matches("userdata", msg, 1, true)
    end)

    it("raises for a coroutine, naming it", function()
      local co = coroutine.create(function() end)
      local msg = refused(function() return coroutine.resume(co) end)
      assert.matches("co", msg, 1, true)
      assert.matches("thread", msg, 1, true)
    end)

    it("raises for an unnamed C function, naming it", function()
      local iter = string.gmatch("a b", "%a")
      local msg = refused(function() return iter() end)
      assert.matches("iter", msg, 1, true)
      assert.matches("function", msg, 1, true)
      local wrapped = coroutine.wrap(function() end)
      local msg2 = refused(function() return wrapped() end)
      assert.matches("wrapped", msg2, 1, true)
      assert.matches("function", msg2, 1, true)
    end)

    it("raises for a cdata, naming it", function()
      local buf = ffi.new("int[4]")
      local msg = refused(function() return buf[0] end)
      assert.matches("buf", msg, 1, true)
      assert.matches("cdata", msg, 1, true)
    end)

    it("names the path to a bad value deep in a table upvalue", function()
      local config = { inner = { handle = coroutine.create(function() end) } }
      local msg = refused(function() return config end)
      H.assert_has_all(msg, { "config", "inner", "handle", "thread" })
    end)

    it("names a bad upvalue of a nested function", function()
      local worker_co = coroutine.create(function() end)
      local function helper() return worker_co end
      local msg = refused(function() return helper() end)
      assert.matches("worker_co", msg, 1, true)
      assert.matches("thread", msg, 1, true)
    end)

    it("leaves handler.run working afterwards", function()
      local co = coroutine.create(function() end)
      refused(function() return co end)
      assert_still_runs("still fine")
    end)
  end)

  describe("a result that cannot travel", function()
    local function bad_result(fn)
      local err = failure(fn)
      assert.are.equal("ProcessExit", err.type)
      assert.are.equal("Process exited with " .. tostring(err.reason), err.message)
      -- The worker pool still works afterwards.
      assert_still_runs(7)
      return err
    end

    it("makes the call return false, err for a function", function()
      bad_result(function() return function() end end)
    end)

    it("makes the call return false, err for a coroutine", function()
      bad_result(function() return 1, coroutine.create(function() end) end)
    end)

    it("makes the call return false, err for a userdata", function()
      bad_result(function() return newproxy() end)
    end)

    it("makes the call return false, err for a bad value deep in a table", function()
      bad_result(function() return { a = { b = coroutine.create(function() end) } } end)
    end)
  end)

  describe("Timeout", function()
    it("ends a job that runs past max_ms, with the message docs/API.md gives", function()
      local t0 = H.now()
      local err = failure(function() while true do end end, { max_ms = 10 })
      local elapsed = H.now() - t0
      assert.are.equal("Timeout", err.type)
      assert.are.equal("Took more than 10ms to complete", err.message)
      H.assert_ended_by(elapsed, 10)
    end)

    it("kills the worker process that ran the job", function()
      local dir = H.tmpdir()
      local path = dir .. "/pid"
      local err = failure(function()
        report_pid(path)
        local i = 0
        while true do i = i + 1 end
      end, { max_ms = 200 })
      assert.are.equal("Timeout", err.type)
      local pid = read_number(path)
      H.rm_r(dir)
      assert.is_number(pid)
      assert.is_false(H.contains(H.workers(), pid))
      assert.is_true(H.wait_until(function() return H.gone(pid) end),
        "worker " .. pid .. " is still " .. tostring(H.proc_state(pid)))
    end)

    it("ends a job blocked in a system call", function()
      local t0 = H.now()
      local err = failure(function()
        local f = require("ffi")
        f.cdef("int poll(void *fds, unsigned long n, int ms);")
        f.C.poll(nil, 0, 10000)
      end, { max_ms = 50 })
      assert.are.equal("Timeout", err.type)
      assert.are.equal("Took more than 50ms to complete", err.message)
      H.assert_ended_by(H.now() - t0, 50)
    end)

    it("ends a job waiting on a child process, and the child with it", function()
      local dir = H.tmpdir()
      local path = dir .. "/pid"
      local err = failure(function()
        os.execute("sleep 30 & echo $! > '" .. path .. "'; wait")
      end, { max_ms = 300 })
      assert.are.equal("Timeout", err.type)
      local pid = read_number(path)
      H.rm_r(dir)
      assert.is_number(pid)
      assert.is_true(H.wait_until(function() return not H.alive(pid) end),
        "the job's child " .. pid .. " is still " .. tostring(H.proc_state(pid)))
    end)

    it("lets a job that ends in time return its result", function()
      local ok, v = run(function() return "quick" end, { max_ms = 5000 })
      assert.is_true(ok)
      assert.are.equal("quick", v)
    end)

    it("gives the limit as written in the message", function()
      local err = failure(function() while true do end end, { max_ms = 25.5 })
      assert.are.equal("Timeout", err.type)
      assert.are.equal("Took more than 25.5ms to complete", err.message)
    end)
  end)

  describe("OOM", function()
    local function grow()
      local t = {}
      for i = 1, 1e7 do t[i] = { i } end
      return #t
    end

    it("ends a job whose heap passes max_heap_bytes, with the message docs/API.md gives", function()
      local err = failure(grow, { max_heap_bytes = 4096 })
      assert.are.equal("OOM", err.type)
      assert.are.equal("Process tried to use more than 4096 bytes of memory", err.message)
    end)

    it("ends as OOM even when the job catches the allocation failure", function()
      local err = failure(function()
        local caught = 0
        for _ = 1, 100 do
          local ok = pcall(function()
            local t = {}
            for i = 1, 1e6 do t[i] = i end
          end)
          if not ok then caught = caught + 1 end
        end
        return "escaped after catching " .. caught
      end, { max_heap_bytes = 64 * 1024 })
      assert.are.equal("OOM", err.type)
      assert.are.equal("Process tried to use more than 65536 bytes of memory", err.message)
    end)

    it("lets a job allocate well up to a large limit", function()
      local limit = 16 * 2 ^ 20
      local ok, n = run(function()
        -- About 12 MiB in 64 KiB strings, kept alive to the end.
        local t = {}
        for i = 1, 192 do t[i] = string.rep(string.char(i % 256), 65536 - 64) end
        return #t
      end, { max_heap_bytes = limit })
      assert.is_true(ok, tostring(n))
      assert.are.equal(192, n)
    end)

    it("does not count the standard libraries", function()
      -- A fresh state with the standard libraries open is far above 64 KiB.
      local ok, v = run(function() return string.format("%d", 1 + 1) end,
        { max_heap_bytes = 64 * 1024 })
      assert.is_true(ok, tostring(v))
      assert.are.equal("2", v)
    end)

    it("counts the closure's upvalues", function()
      local big = string.rep("x", 2 ^ 20)
      local err = failure(function() return #big end, { max_heap_bytes = 64 * 1024 })
      assert.are.equal("OOM", err.type)
      local ok, n = run(function() return #big end, { max_heap_bytes = 4 * 2 ^ 20 })
      assert.is_true(ok)
      assert.are.equal(2 ^ 20, n)
    end)

    it("leaves handler.run working afterwards", function()
      failure(grow, { max_heap_bytes = 4096 })
      assert_still_runs(5)
    end)
  end)

  describe("ProcessExit", function()
    it("reports a raised string as reason, with its position, and a traceback", function()
      local err = failure(function() error("boom") end)
      assert.are.equal("ProcessExit", err.type)
      assert.are.equal("string", type(err.reason))
      assert.matches("run_spec%.lua:%d+: boom$", err.reason)
      assert.are.equal("Process exited with " .. err.reason, err.message)
      assert.are.equal("string", type(err.traceback))
      assert.matches("stack traceback", err.traceback, 1, true)
    end)

    it("reports a raised table as reason, intact", function()
      local err = failure(function() error({ code = 7, tags = { "a", "b" } }) end)
      assert.are.equal("ProcessExit", err.type)
      assert.are.equal("table", type(err.reason))
      assert.are.equal(7, err.reason.code)
      assert.are.same({ "a", "b" }, err.reason.tags)
      assert.are.equal("Process exited with " .. tostring(err.reason), err.message)
    end)

    it("reports a raised value that cannot travel", function()
      local err = failure(function() error(coroutine.create(function() end)) end)
      assert.are.equal("ProcessExit", err.type)
      assert.matches("^Process exited with ", err.message)
    end)

    -- A job that ends its worker, the reason the ProcessExit gives, and
    -- whether its message is "Process exited with <reason>" (`message`);
    -- `also` checks more.
    local exits = {
      { "reports a string raised at level 0 as it is", function() error("plain", 0) end,
        reason = "plain", message = true },
      { "reports error(nil) with a nil reason", function() error(nil) end, reason = nil,
        message = true },
      { "reports os.exit(3) as exit 3", function() os.exit(3) end, reason = "exit 3",
        message = true },
      { "reports os.exit(0) and os.exit(true) as exit 0, os.exit(false) as exit 1",
        function() os.exit(0) end, reason = "exit 0", message = true, also = function()
          assert.are.equal("exit 0", failure(function() os.exit(true) end).reason)
          assert.are.equal("exit 1", failure(function() os.exit(false) end).reason)
        end },
      { "reports a segfault through the FFI as SIGSEGV", function()
        local f = require("ffi")
        f.cast("int *", 0)[0] = 1
      end, reason = "SIGSEGV", message = true },
      { "reports abort() as SIGABRT", function()
        local f = require("ffi")
        f.cdef("void abort(void);")
        f.C.abort()
      end, reason = "SIGABRT", message = true },
      { "reports a worker killed by SIGKILL from outside the job as SIGKILL", function()
        local f = require("ffi")
        f.cdef("int kill(int pid, int sig); int getpid(void);")
        f.C.kill(f.C.getpid(), 9)
      end, reason = "SIGKILL" },
    }
    for _, case in ipairs(exits) do
      it(case[1], function()
        local err = failure(case[2])
        assert.are.equal("ProcessExit", err.type)
        assert.are.equal(case.reason, err.reason)
        if case.message then
          assert.are.equal("Process exited with " .. tostring(case.reason), err.message)
        end
        if case.also then case.also() end
      end)
    end

    it("replaces a dead worker: the next run succeeds", function()
      local dir = H.tmpdir()
      local path = dir .. "/pid"
      local err = failure(function()
        report_pid(path)
        local f = require("ffi")
        f.cast("int *", 0)[0] = 1
      end)
      local pid = read_number(path)
      H.rm_r(dir)
      assert.are.equal("SIGSEGV", err.reason)
      assert.is_number(pid)
      assert.is_false(H.contains(H.workers(), pid))
      assert.is_true(H.wait_until(function() return H.gone(pid) end))
      assert_still_runs("next")
    end)
  end)

  describe("error values", function()
    local cases = {
      { "Timeout", function() while true do end end, { max_ms = 10 } },
      { "OOM", function() local t = {} for i = 1, 1e7 do t[i] = i end end, { max_heap_bytes = 4096 } },
      { "ProcessExit", function() error("boom") end },
      { "ProcessExit", function() os.exit(3) end },
    }

    for _, case in ipairs(cases) do
      local kind, fn, opts = case[1], case[2], case[3]

      it(kind .. ": a table with type and message; tostring gives the message", function()
        local err = failure(fn, opts)
        assert.are.equal(kind, err.type)
        assert.are.equal("string", type(err.message))
        assert.are.equal(err.message, tostring(err))
        assert.is_nil(err.rejected)
      end)

      it(kind .. ": error(err) re-raises the same value", function()
        local err = failure(fn, opts)
        local ok, caught = pcall(error, err)
        assert.is_false(ok)
        assert.is_true(rawequal(err, caught))
        local ok2, caught2 = pcall(function() error(err, 2) end)
        assert.is_false(ok2)
        assert.is_true(rawequal(err, caught2))
      end)
    end

    it("InsufficientMemory: a heap limit beyond the default pool's budget is rejected", function()
      local before = started()
      local err = failure(function() return 1 end, { max_heap_bytes = 20 * 2 ^ 30 })
      assert.are.equal("InsufficientMemory", err.type)
      assert.are.equal("Not enough memory available", err.message)
      assert.are.equal(err.message, tostring(err))
      assert.is_true(err.rejected)
      assert.are.equal(before, started())
    end)

    it("prints its message when re-raised and not caught", function()
      local out = H.run_host([[
        local handler = require("handler")
        local ok, err = handler.run(function() os.exit(3) end)
        error(err)
      ]])
      assert.matches("Process exited with exit 3", out, 1, true)
      assert.not_matches("error object", out, 1, true)
    end)
  end)

  describe("options", function()
    local function noop() end

    it("accepts nil, an empty table and every valid option", function()
      assert.is_true((run(noop)))
      assert.is_true((run(noop, nil)))
      assert.is_true((run(noop, {})))
      assert.is_true((run(noop, { max_ms = 1000 })))
      assert.is_true((run(noop, { max_heap_bytes = 2 ^ 20 })))
      assert.is_true((run(noop, { max_ms = 1500.5, max_heap_bytes = 2 ^ 24 })))
    end)

    it("raises when fn is not a function, naming the argument", function()
      for _, bad in ipairs({ 1, "return 1", {}, true }) do
        local msg = raised(run, bad)
        H.assert_has_all(msg, { "#1", "function expected", type(bad) })
      end
      assert.matches("#1", raised(run), 1, true)
    end)

    it("raises when opts is not a table", function()
      for _, bad in ipairs({ 10, "max_ms=10", true, noop }) do
        local msg = raised(run, noop, bad)
        assert.matches("table", msg, 1, true)
        assert.matches(type(bad), msg, 1, true)
      end
    end)

    it("raises on an unknown option, naming it", function()
      local msg = raised(run, noop, { max_mss = 10 })
      assert.matches("max_mss", msg, 1, true)
      msg = raised(run, noop, { 10 })
      assert.matches("1", msg, 1, true)
    end)

    local bad_values = {
      max_ms = { "x", -1, 0 / 0, {}, true },
      max_heap_bytes = { 0, -4096, "4096", 1 / 0, 0 / 0 },
    }
    for _, key in ipairs({ "max_ms", "max_heap_bytes" }) do
      it("raises on a bad " .. key .. ", naming the key and what was expected", function()
        for _, bad in ipairs(bad_values[key]) do
          local msg = raised(run, noop, { [key] = bad })
          assert.matches(key, msg, 1, true)
          assert.matches("expected", msg, 1, true)
        end
      end)
    end

    it("raises at the caller's level and starts no job", function()
      local before = started()
      local ok, msg = pcall(function()
        local r = run(noop, { max_ms = "x" }) -- not a tail call: this line is the caller
        return r
      end)
      assert.is_false(ok)
      assert.matches("run_spec.lua:", msg, 1, true)
      assert.are.equal(before, started())
    end)
  end)
end)
