-- output_spec.lua: what a job writes to its stdout and stderr is metered by
-- the host, at the descriptor: print, io.write, the FFI and the commands a
-- job runs all count against max_output_bytes, and past it the job ends as
-- ProcessExit with reason "output limit", whatever it catches. And the
-- memory a job maps, shared mappings included, is bounded by the worker's
-- RLIMIT_AS.
--
-- Jobs that write run in a disposable host (H.run_host), so their output
-- lands in a file this spec reads, not in the test runner's.
local handler = require("handler")
local H = require("spec.support.helpers")

local format, tostring, ipairs, type = string.format, tostring, ipairs, type

-- Sanitized (ASan) builds have no RLIMIT_AS in their workers.
local it_rlimit_as = handler._core.sanitized and pending or it

-- Runs `body` in a disposable host where `handler` is loaded and
-- report(name, ok, v) records a job's outcome in a file of its own (not on
-- stdout, which the jobs share). Returns the rows by name ({ ok, type,
-- reason, message, detail, value }) and everything the host printed.
local function host(body)
  local dir = H.tmpdir()
  local res = dir .. "/res"
  local out = H.run_host(format([[
    local handler = require("handler")
    local res = assert(io.open(%q, "w"))
    local function field(v, k)
      return type(v) == "table" and tostring(v[k]) or "-"
    end
    local function report(name, ok, v)
      res:write(name, "\t", tostring(ok), "\t", field(v, "type"), "\t", field(v, "reason"), "\t",
        field(v, "message"), "\t", field(v, "detail"), "\t",
        type(v) == "table" and "-" or tostring(v), "\n")
      res:flush()
    end
    %s
    res:close()
  ]], res, body))
  local rows = {}
  for name, ok, kind, reason, message, detail, value in
    (H.read_file(res) or ""):gmatch("([^\t\n]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\n]*)\n") do
    rows[name] = { ok = ok, type = kind, reason = reason, message = message, detail = detail,
      value = value }
  end
  H.rm_r(dir)
  return rows, out
end

-- Asserts that the row `name` is a job ended for its output.
local function assert_output_limit(rows, name, out)
  local r = rows[name]
  assert(r, format("no report for %s; the host printed:\n%s", name, out:sub(1, 3000)))
  assert.are.equal("false", r.ok, name)
  assert.are.equal("ProcessExit", r.type, name)
  assert.are.equal("output limit", r.reason, name)
  assert.are.equal("Process exited with output limit", r.message, name)
  assert.matches("more than %d+ bytes", r.detail)
end

-- The longest run of `c` in s.
local function longest(s, c)
  local n = 0
  for run in s:gmatch(c .. "+") do
    if #run > n then n = #run end
  end
  return n
end

describe("output", function()
  H.leak_checked()

  it("print past max_output_bytes ends the job as ProcessExit, output limit", function()
    local rows, out = host([[
      report("print", handler.run(function()
        print(("x"):rep(100000))
        return "done"
      end, { max_output_bytes = 1000 }))
    ]])
    assert_output_limit(rows, "print", out)
    assert.are.equal("wrote more than 1000 bytes to stdout and stderr", rows.print.detail)
    -- What went on to the host's stdout stops at the limit.
    assert(longest(out, "x") <= 1000, "the host got " .. longest(out, "x") .. " bytes")
  end)

  it("cannot be caught: print past the limit inside pcall still ends the job", function()
    local rows, out = host([[
      report("pcall", handler.run(function()
        local ok = pcall(print, ("x"):rep(100000))
        for _ = 1, 100 do pcall(io.write, ("x"):rep(1000)) end
        io.stdout:flush()
        return "survived", ok
      end, { max_output_bytes = 1000 }))
    ]])
    assert_output_limit(rows, "pcall", out)
  end)

  -- The FFI's write(2) to descriptor 1 and to descriptor 2, a MiB each.
  for _, c in ipairs({ { 1, "y", "ffi" }, { 2, "z", "ffi2" } }) do
    local fd, char, tag = c[1], c[2], c[3]
    it("counts what the FFI writes to descriptor " .. fd, function()
      local rows, out = host(([[
        report(%q, handler.run(function()
          local ffi = require("ffi")
          ffi.cdef("long write(int fd, const void *p, size_t n);")
          local s = (%q):rep(2^20)
          ffi.C.write(%d, s, #s)
          return "done"
        end, { max_output_bytes = 1000 }))
      ]]):format(tag, char, fd))
      assert_output_limit(rows, tag, out)
      assert(longest(out, char) <= 1000, "the host got " .. longest(out, char) .. " bytes")
    end)
  end

  it("counts what a command the job runs writes", function()
    local rows, out = host([[
      report("child", handler.run(function()
        return os.execute("yes | head -c 5000000")
      end, { max_output_bytes = 1000, max_ms = 20000 }))
    ]])
    assert_output_limit(rows, "child", out)
    assert(longest(out, "y\n") <= 1000, "the host got more than the limit")
  end)

  it("lets a job write exactly max_output_bytes, to the host's stdout and stderr", function()
    local rows, out = host([[
      report("exact", handler.run(function()
        io.write(("a"):rep(600))
        io.stderr:write(("b"):rep(399))
        print()
        return "done"
      end, { max_output_bytes = 1000 }))
      report("one_more", handler.run(function()
        io.write(("c"):rep(1001))
        return "done"
      end, { max_output_bytes = 1000 }))
    ]])
    assert.are.equal("true", rows.exact.ok)
    assert.are.equal("done", rows.exact.value)
    assert.matches(("a"):rep(600) .. "\n", out, 1, true)
    assert.matches(("b"):rep(399), out, 1, true)
    assert_output_limit(rows, "one_more", out)
    assert.are.equal(1000, longest(out, "c"))
  end)

  it("never counts job N's output for job N+1 on the same worker", function()
    local rows, out = host([[
      local pool = handler.pool({ max_workers = 1 })
      local pids = {}
      for i = 1, 5 do
        report("job" .. i, pool:run(function()
          io.write(("n"):rep(900), "\n")
          return "ok"
        end, { max_output_bytes = 901 }))
        pids[i] = table.concat(handler._core.procs(), ",")
      end
      report("same_worker", true, pids[1] == pids[5] and pids[1] ~= "" and "yes" or
        table.concat(pids, ";"))
    ]])
    for i = 1, 5 do
      local r = rows["job" .. i]
      assert(r, out:sub(1, 2000))
      assert.are.equal("true", r.ok, "job" .. i .. ": " .. tostring(r.reason))
    end
    assert.are.equal("yes", rows.same_worker.value)
    local _, lines = out:gsub(("n"):rep(900) .. "\n", "")
    assert.are.equal(5, lines)
  end)

  it("meters sandboxed workers too", function()
    local rows, out = host([[
      report("syscalls", handler.run(function()
        local ffi = require("ffi")
        ffi.cdef("long write(int fd, const void *p, size_t n);")
        local s = ("s"):rep(2^20)
        ffi.C.write(1, s, #s)
        return "done"
      end, { max_output_bytes = 1000, sandbox = "syscalls" }))
      report("strict", handler.run(function()
        pcall(io.write, ("t"):rep(100000))
        return "done"
      end, { max_output_bytes = 1000, sandbox = true }))
    ]])
    assert_output_limit(rows, "syscalls", out)
    assert_output_limit(rows, "strict", out)
  end)

  it("keeps the host alive when its stdout is a pipe nobody reads", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/host.lua", [[
      local handler = require("handler")
      local ok, v = handler.run(function() print(("p"):rep(100000)) return "done" end)
      io.stderr:write("after\t", tostring(ok), "\t", tostring(v), "\n")
    ]])
    -- The reader is gone before the job writes: the host must not die of
    -- SIGPIPE, and the job still ends normally.
    os.execute(H.lua_env() .. " timeout -s KILL 60 luajit " .. H.shell_quote(dir .. "/host.lua")
      .. " 2> " .. H.shell_quote(dir .. "/err") .. " | true")
    local err = H.read_file(dir .. "/err") or ""
    H.rm_r(dir)
    assert.matches("after\ttrue\tdone\n", err, 1, true)
  end)
end)

describe("memory outside the Lua heap", function()
  H.leak_checked()

  -- Without a sandbox RLIMIT_AS stops it; the system call filter of the
  -- "syscalls" profile refuses a shared mapping before that.
  for _, c in ipairs({ { false, { MAP_FAILED = true, OOM = true } },
                       { "syscalls", { SandboxViolation = true } } }) do
    it_rlimit_as("a 1 GiB shared mapping fails in a worker with max_heap_bytes = 1 MiB, sandbox = "
      .. tostring(c[1]), function()
      local ok, v = handler.run(function()
        local ffi = require("ffi")
        ffi.cdef([[void *mmap(void *a, size_t n, int prot, int flags, int fd, long off);]])
        local n = 2^30
        -- PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS
        local p = ffi.C.mmap(nil, n, 3, 0x01 + 0x20, -1, 0)
        if ffi.cast("intptr_t", p) == -1 then return "MAP_FAILED" end
        local b = ffi.cast("volatile char *", p)
        for i = 0, n - 1, 4096 do b[i] = 1 end
        return "touched"
      end, { max_heap_bytes = 2^20, sandbox = c[1], max_ms = 30000 })
      local got = ok and v or v.type
      assert.is_true(c[2][got] == true, "got " .. tostring(got))
    end)
  end

  it_rlimit_as("bounds the worker's address space by RLIMIT_AS, sized by max_heap_bytes",
    function()
      local function limits()
        local f = require("ffi")
        pcall(f.cdef, [[struct hd_out_rlimit { unsigned long cur, max; };
          int getrlimit(int res, struct hd_out_rlimit *r);]])
        local rl = f.new("struct hd_out_rlimit")
        f.C.getrlimit(9, rl) -- RLIMIT_AS
        return tonumber(rl.cur)
      end
      local ok1, small = handler.run(limits, { max_heap_bytes = 2^20 })
      local ok2, big = handler.run(limits, { max_heap_bytes = 2^30 })
      assert.is_true(ok1, tostring(small))
      assert.is_true(ok2, tostring(big))
      assert(small < 2^30, "RLIMIT_AS is " .. small)
      -- Three times the heap apart, as the data limit.
      assert.are.equal(3 * (2^30 - 2^20), big - small)
    end)

  it("runs an ordinary job with the default heap: the JIT on, a 5 MB string", function()
    local s = ("0123456789"):rep(5 * 10^5)
    local ok, n, sum, jit_on = handler.run(function()
      local byte, total = string.byte, 0
      for i = 1, #s, 64 do total = total + byte(s, i) end
      return #s, total, jit.status()
    end)
    local expect = 0
    for i = 1, #s, 64 do expect = expect + s:byte(i) end
    assert.is_true(ok, tostring(n))
    assert.are.equal(5 * 10^6, n)
    assert.are.equal(expect, sum)
    assert.is_true(jit_on)
  end)
end)
