-- hostile_spec.lua: a worker that writes whatever it likes on its reply
-- pipe, and the races around kills and exits.
--
-- A job plays the hostile worker: it writes raw frames to fd 3 through the
-- FFI, then exits or sleeps so that the parent must react. After each case
-- the caller has a clear error, the host still runs jobs, the worker that
-- misbehaved is gone, and nothing leaked (fds, processes, pool budgets).
--
-- Frames need the id the parent gave the job. Ids count up by one per job
-- submitted in the process, so next_id() submits a probe, reads its id, and
-- the attack that is submitted right after it gets the next one.
local handler = require("handler")
local H = require("spec.support.helpers")
local ffi = require("ffi")

local core = handler._core
local encode = core.encode
local char, rep, floor, concat, format = string.char, string.rep, math.floor, table.concat,
  string.format
local tostring, tonumber, type, pcall, ipairs, pairs, error, rawequal =
  tostring, tonumber, type, pcall, ipairs, pairs, error, rawequal

pcall(ffi.cdef, [[int hd_hostile_kill(int pid, int sig) __asm__("kill");]])

---------------------------------------------------------------------------
-- The wire format (src/common/).

local REPLY, REPLY_LAST = 2, 3
local OK, ERROR = 0, 1
local T_NUM, T_STR, T_TABLE, T_FUNC, T_MOD = 3, 4, 5, 9, 11

local W = require("spec.support.wire")
local u32, u64, uv, frame, reply, str = W.u32, W.u64, W.uv, W.frame, W.reply, W.str

local num = W.num

---------------------------------------------------------------------------
-- Helpers.

-- The id the next job submitted in this process will get.
local function next_id()
  local probe = handler.default_pool():async(function() end)
  local id = core.job_id(probe._ud)
  assert.is_true((probe:await()))
  return id + 1
end

local read_file = H.read_file
local report_pid = H.job_bodies().report_pid

-- A job that writes its pid to pidfile, then `bytes` on the reply pipe,
-- then, when given `bytes2`, waits for the file `gate` to exist and writes
-- them too; then it exits at once ("exit") or sleeps 20 s ("sleep"),
-- leaving the parent to end it.
local function attack(bytes, pidfile, after, bytes2, gate)
  return function()
    local f = require("ffi")
    pcall(f.cdef, "long write(int fd, const void *p, unsigned long n);")
    pcall(f.cdef, "int poll(void *fds, unsigned long n, int ms);")
    report_pid(pidfile)
    local function put(s)
      local p, off = f.cast("const char *", s), 0
      while off < #s do
        local n = tonumber(f.C.write(3, p + off, #s - off))
        if n <= 0 then return end
        off = off + n
      end
    end
    put(bytes)
    if bytes2 ~= nil then
      for _ = 1, 2000 do
        local g = io.open(gate)
        if g ~= nil then
          g:close()
          break
        end
        f.C.poll(nil, 0, 5)
      end
      put(bytes2)
    end
    if after == "exit" then os.exit(0) end
    f.C.poll(nil, 0, 20000)
  end
end

-- Every job the pool started ended exactly once, as one outcome.
local function assert_resolved_once(pool)
  local s = pool:stats()
  assert.are.equal(s.started, s.succeeded + s.failed)
end

-- The host still runs jobs, in the pool and in the default pool.
local function assert_responsive(pool)
  local ok, v = pool:run(function() return 1 + 1 end)
  assert.is_true(ok, tostring(v))
  assert.are.equal(2, v)
  ok, v = handler.run(function() return 1 + 1 end)
  assert.is_true(ok, tostring(v))
  assert.are.equal(2, v)
end

-- What both blocks below share: a warm host and a scratch directory for the
-- block; a snapshot and a fresh pool of two workers for each test, closed
-- after it (each test checks for leaks itself, with that pool). The returned
-- table holds the current snap, pool and dir, and path(name): a new file
-- name in dir.
local function fixture()
  local fx, n = {}, 0

  setup(function()
    H.warm()
    fx.dir = H.tmpdir()
    n = 0
  end)

  teardown(function()
    H.rm_r(fx.dir)
  end)

  before_each(function()
    fx.snap = H.snapshot()
    fx.pool = handler.pool({ max_workers = 2 })
  end)

  after_each(function()
    fx.pool:close()
    H.wait_until(function() return fx.pool:stats().processes == 0 end)
  end)

  function fx.path(name)
    n = n + 1
    return format("%s/%s%d", fx.dir, name, n)
  end

  return fx
end

describe("hostile bytes from a worker", function()
  local pids

  before_each(function()
    pids = {}
  end)

  after_each(function()
    -- Only for a test that already failed: no stray process may spill over.
    for _, pid in ipairs(pids) do
      if H.alive(pid) then H.kill9(pid) end
    end
  end)

  local fx = fixture()

  local function pidfile()
    return fx.path("pid")
  end

  -- The pid the attack at path wrote, waiting for it if need be.
  local function attacker(path)
    local pid
    assert.is_true(H.wait_until(function()
      pid = tonumber(read_file(path) or "")
      return pid ~= nil
    end), "the attack never wrote its pid")
    pids[#pids + 1] = pid
    return pid
  end

  -- The worker is gone, and handler has noticed (it no longer lists it).
  local function assert_gone(pid)
    assert.is_true(H.wait_until(function()
      return H.gone(pid) and not H.contains(H.workers(), pid)
    end), format("worker %d that misbehaved is still there (%s)", pid,
      tostring(H.proc_state(pid))))
  end

  -- What every case must leave true: the worker that misbehaved is gone,
  -- each job ended once, the host still runs jobs, nothing leaked.
  local function assert_after(pid)
    assert_gone(pid)
    assert_resolved_once(fx.pool)
    assert_responsive(fx.pool)
    H.assert_clean(fx.snap, { fx.pool })
  end

  -- Runs the attack and checks everything a case must leave true; returns
  -- the outcome. `case`: bytes(id) → string, after, ok (default false),
  -- reason (a pattern err.reason must match), type (default "ProcessExit"),
  -- max_ms; bytes2(id) → string: more bytes, written once the call has
  -- returned, so they reach a worker the parent considers idle.
  local function hostile(case)
    local path = pidfile()
    local gate = path .. ".gate"
    local id = next_id()
    local res = { fx.pool:run(attack(case.bytes(id), path, case.after, case.bytes2 and
      case.bytes2(id), gate), { max_ms = case.max_ms or 5000 }) }
    local pid = attacker(path)
    if case.bytes2 then H.write_file(gate, "") end
    if case.ok then
      assert.is_true(res[1], tostring(res[2]))
    else
      assert.is_false(res[1], "the call succeeded with " .. tostring(res[2]))
      local err = res[2]
      assert.are.equal("table", type(err))
      assert.are.equal(case.type or "ProcessExit", err.type, tostring(err))
      if case.reason then
        assert.matches(case.reason, tostring(err.reason), 1, false,
          "reason: " .. tostring(err.reason))
      end
    end
    assert_after(pid)
    return res
  end

  local hi = encode("hi")

  describe("in the frame", function()
    local cases = {
      { "a length of 2^32 - 1", after = "sleep", reason = "max_result_bytes",
        bytes = function(id) return u32(2^32 - 1) .. char(REPLY) .. u64(id) .. char(OK) .. hi end },
      { "a length just past max_result_bytes", after = "sleep", reason = "max_result_bytes",
        bytes = function(id) return u32(64 * 2^20 + 2) .. char(REPLY) .. u64(id) .. char(OK) end },
      { "a reply for the wrong job", after = "sleep", reason = "bad reply.*wrong job",
        bytes = function(id) return reply(id + 1000, OK, hi) end },
      { "a reply for job 0", after = "sleep", reason = "bad reply.*wrong job",
        bytes = function() return reply(0, OK, hi) end },
      { "an unknown frame type", after = "sleep", reason = "bad reply.*frame type 9",
        bytes = function(id) return frame(9, id, char(OK) .. hi) end },
      { "a job frame sent back", after = "sleep", reason = "bad reply.*frame type 1",
        bytes = function(id) return frame(1, id, char(OK) .. hi) end },
      { "a stats frame of the wrong size", after = "sleep", reason = "bad reply.*bad stats frame",
        bytes = function(id) return frame(6, id, u64(1)) .. reply(id, OK, hi) end },
      { "a stats frame for another job", after = "sleep", reason = "bad reply.*bad stats frame",
        bytes = function(id)
          return frame(6, id + 1, u64(1) .. u64(2) .. u64(3)) .. reply(id, OK, hi)
        end },
      { "two stats frames", after = "sleep", reason = "bad reply.*bad stats frame",
        bytes = function(id)
          local stats = frame(6, id, u64(1) .. u64(2) .. u64(3))
          return stats .. stats .. reply(id, OK, hi)
        end },
      { "an event for another job", after = "sleep", reason = "bad reply.*event for the wrong job",
        bytes = function(id) return frame(7, id + 1, uv(1) .. char(0)) .. reply(id, OK, hi) end },
      { "an event that does not decode", after = "sleep", reason = "bad reply",
        bytes = function(id) return frame(7, id, uv(1) .. char(200)) .. reply(id, OK, hi) end },
      { "an empty reply", after = "sleep", reason = "bad reply.*empty",
        bytes = function(id) return frame(REPLY, id, "") end },
      { "an unknown status", after = "sleep", reason = "bad reply.*status 9",
        bytes = function(id) return reply(id, 9, hi) end },
      { "garbage instead of a frame", after = "sleep", reason = "bad reply",
        bytes = function() return rep("\255", 64) end },
      { "a truncated frame, then exit", after = "exit", reason = "exit 0",
        bytes = function(id) return u32(100) .. char(REPLY) .. u64(id) .. char(OK) .. hi end },
      { "a truncated header, then exit", after = "exit", reason = "exit 0",
        bytes = function() return "\5\0\0\0\2" end },
      { "a truncated frame, then silence", after = "sleep", type = "Timeout", max_ms = 300,
        bytes = function(id) return u32(100) .. char(REPLY) .. u64(id) .. char(OK) .. hi end },
      { "trailing garbage after a valid reply", after = "sleep",
        reason = "bad reply.*bytes after the reply",
        bytes = function(id) return reply(id, OK, hi) .. "garbage" end },
      { "two replies for one job at once", after = "sleep",
        reason = "bad reply.*bytes after the reply",
        bytes = function(id) return reply(id, OK, hi) .. reply(id, OK, hi) end },
    }
    for _, case in ipairs(cases) do
      it("refuses " .. case[1], function()
        hostile(case)
      end)
    end

    -- A job of items (pool:map's batches) is answered by one reply per
    -- item; the worker runs the job's function for the first item, which
    -- writes the replies of its choice.
    local function hostile_items(bytes)
      local path = pidfile()
      local id = next_id()
      local job = assert(fx.pool:_async_items(attack(bytes(id), path, "sleep"),
        { 1, 2 }, { max_ms = 5000 }))
      job:await()
      local pid = attacker(path)
      local res = { { job:_item(1) }, { job:_item(2) } }
      assert_after(pid)
      return res
    end

    -- Each keeps the first item's reply and refuses the second's.
    local item_cases = {
      { "one reply more than the items", "bytes after the reply", function(id)
        return reply(id, OK, hi) .. reply(id, OK, encode("two")) .. reply(id, OK, hi)
      end },
      { "an item's reply for another job", "wrong job", function(id)
        return reply(id, OK, hi) .. reply(id + 1, OK, hi)
      end },
    }
    for _, case in ipairs(item_cases) do
      it("keeps the replies of a job's items, and refuses " .. case[1], function()
        local res = hostile_items(case[3])
        assert.are.same({ true, "hi" }, res[1])
        assert.is_false(res[2][1])
        assert.matches(case[2], tostring(res[2][2].reason))
      end)
    end

    it("keeps the first of two replies sent apart, and ends the worker at the second", function()
      local res = hostile({ after = "sleep", ok = true,
        bytes = function(id) return reply(id, OK, hi) end,
        bytes2 = function(id) return reply(id, OK, encode("second")) end })
      assert.are.equal("hi", res[2])
    end)

    it("does not give a job to a worker that exited after its reply", function()
      -- The worker replied (REPLY: it stays for more work), then exited. Once
      -- it is gone its reply pipe is at EOF. The next job must not fail with
      -- "exit 0" without ever having run: an idle worker is looked at before
      -- it gets a job (once its last reply is a millisecond old), and a job
      -- sent to a worker that died without reading it starts again on
      -- another.
      local path = pidfile()
      local id = next_id()
      local ok, v = fx.pool:run(attack(reply(id, OK, hi), path, "exit"))
      assert.is_true(ok, tostring(v))
      assert.are.equal("hi", v)
      local pid = attacker(path)
      -- Wait without running handler's loop: the parent has not read the
      -- EOF or the exit report yet, as in a host that submits right away.
      local deadline = H.now() + 5
      while not H.gone(pid) and H.now() < deadline do H.sleep_ms(5) end
      assert.is_true(H.gone(pid))
      ok, v = fx.pool:run(function() return 1 + 1 end)
      assert.is_true(ok, tostring(v))
      assert.are.equal(2, v)
      assert_gone(pid)
      assert_resolved_once(fx.pool)
      H.assert_clean(fx.snap, { fx.pool })
    end)

    it("ends a worker that sends a frame while idle", function()
      local res = hostile({ after = "sleep", ok = true,
        bytes = function(id) return reply(id, OK, hi) end,
        bytes2 = function() return rep("x", 32) end })
      assert.are.equal("hi", res[2])
    end)

    it("ends a worker that sends a few bytes while idle", function()
      -- Fewer bytes than a frame header: still bytes nobody asked for.
      local res = hostile({ after = "sleep", ok = true,
        bytes = function(id) return reply(id, OK, hi) end,
        bytes2 = function() return "junk" end })
      assert.are.equal("hi", res[2])
    end)
  end)

  describe("in the message", function()
    -- n tables, each the value of key "k" in the one before.
    local function nest(count)
      local open = char(T_TABLE, 0, 1)
      return uv(1) .. open .. rep(str("k") .. open, count - 1)
    end

    local cases = {
      { "nesting a million deep", reason = "bad message: nested too deep",
        msg = function() return nest(1e6) end },
      { "a string longer than the message", reason = "bad message: truncated string",
        msg = function() return uv(1) .. char(T_STR) .. uv(2^40) .. "abc" end },
      { "a value count of 2^63", reason = "bad message: too many values",
        msg = function() return uv(2^63) end },
      { "a NaN key", reason = "bad message: NaN table key",
        msg = function() return uv(1) .. char(T_TABLE, 0, 1, T_NUM) .. num(0 / 0) .. char(2, 7) end },
      { "a nil key", reason = "bad message: nil table key",
        msg = function() return uv(1) .. char(T_TABLE, 0, 1, 0, 2, 7) end },
      { "an unknown tag", reason = "bad message: unknown tag 20",
        msg = function() return uv(1) .. char(20) end },
      { "tag 255", reason = "bad message: unknown tag 255",
        msg = function() return uv(1) .. char(255) end },
      { "a reference to nothing", reason = "bad message: reference to a value not yet sent",
        msg = function() return uv(1) .. char(8, 0) end },
      { "trailing bytes in the message", reason = "bad message: trailing bytes",
        msg = function() return hi .. "more" end },
      { "ten million keys claimed, then truncated", reason = "bad message: truncated",
        msg = function() return uv(1) .. char(T_TABLE) .. uv(1e7) .. uv(1e7) .. str("x") end },
      { "a function where data is expected",
        reason = "bad message: function where data was expected",
        msg = function() return encode(function() return os.exit(7) end) end },
      { "bytecode in a table", reason = "bad message: function where data was expected",
        msg = function() return encode({ f = function() end }) end },
      { "source text as a function", reason = "bad message: function where data was expected",
        msg = function() return uv(1) .. char(T_FUNC) .. str("os.exit(7)"):sub(2) .. uv(0) end },
      { "a function in an error", reason = "bad message: function where data was expected",
        status = ERROR, msg = function() return encode(function() end, "traceback") end },
    }
    for _, case in ipairs(cases) do
      it("refuses " .. case[1], function()
        local msg = case.msg()
        hostile({ after = "exit", reason = case.reason,
          bytes = function(id) return reply(id, case.status or OK, msg) end })
      end)
    end

    it("accepts ten million keys claimed with little data", function()
      local msg = uv(1) .. char(T_TABLE) .. uv(1e7) .. uv(1e7) .. str("x") .. char(T_NUM) ..
        num(1) .. char(7)
      local res = hostile({ after = "exit", ok = true,
        bytes = function(id) return reply(id, OK, msg) end })
      assert.are.same({ x = 1 }, res[2])
    end)

    it("accepts 200000 keys behind a claim of ten million", function()
      local parts = { uv(1), char(T_TABLE), uv(1e7), uv(1e7) }
      for i = 1, 200000 do parts[#parts + 1] = char(T_NUM) .. num(i) .. char(2) end
      parts[#parts + 1] = char(7)
      local msg = concat(parts)
      local res = hostile({ after = "exit", ok = true,
        bytes = function(id) return reply(id, OK, msg) end })
      assert.are.equal(200000, #res[2])
      assert.is_true(res[2][200000])
    end)

    it("never loads a module a reply names", function()
      local marker = fx.dir .. "/evil-loaded"
      H.write_file(fx.dir .. "/hd_hostile_evil.lua",
        format("io.open(%q, 'w'):close() return {}", marker))
      local saved = package.path
      package.path = fx.dir .. "/?.lua;" .. package.path
      local ok, err = pcall(hostile, { after = "exit",
        reason = 'bad message: no module in package.loaded named "hd_hostile_evil"',
        bytes = function(id) return reply(id, OK, uv(1) .. char(T_MOD) .. str("hd_hostile_evil"):sub(2)) end })
      package.path = saved
      if not ok then error(err, 0) end
      assert.is_nil(read_file(marker))
      assert.is_nil(package.loaded.hd_hostile_evil)
    end)

    it("ends a worker whose reply does not decode, before it gets another job", function()
      -- The frame is well formed, its message is not: the worker lied, so it
      -- must not be trusted with the next job (its closure and upvalues).
      hostile({ after = "sleep", reason = "bad message",
        bytes = function(id) return reply(id, OK, uv(1) .. char(14)) end })
    end)

    it("does not let a result's metatable call the host's functions", function()
      -- Results are data. A metatable naming a host function would make an
      -- ordinary read of the result call it (here: t.x would return the
      -- host's registry).
      local ok, t = fx.pool:run(function()
        return setmetatable({}, { __index = debug.getregistry })
      end)
      if ok then
        assert.are.equal("table", type(t))
        assert.is_false(rawequal(debug.getregistry(), t.x),
          "reading a field of the result called debug.getregistry")
      end
      ok, t = fx.pool:run(function()
        return { inner = setmetatable({}, { __call = debug.getregistry }) }
      end)
      if ok then
        local called, v = pcall(t.inner)
        assert.is_false(called and rawequal(debug.getregistry(), v),
          "calling the result called debug.getregistry")
      end
      assert_resolved_once(fx.pool)
      assert_responsive(fx.pool)
      H.assert_clean(fx.snap, { fx.pool })
    end)
  end)
end)

describe("races", function()
  local fx = fixture()
  local path = fx.path

  local function finish()
    assert_resolved_once(fx.pool)
    assert_responsive(fx.pool)
    H.assert_clean(fx.snap, { fx.pool })
  end

  -- Asserts a job ended as killed by its user.
  local function assert_killed(ok, err)
    assert.is_false(ok)
    assert.are.equal("ProcessExit", err.type, tostring(err))
    assert.are.equal("user_killed", err.reason)
  end

  -- The live workers handler knows, as a set.
  local function worker_set()
    local set = {}
    for _, pid in ipairs(H.workers()) do set[pid] = true end
    return set
  end

  it("kills a worker in the middle of sending its reply", function()
    -- The job sends a 20 MB reply slowly, and says when the first megabyte
    -- is out: the parent is then certainly holding half a frame.
    local size = 20 * 2^20
    local marker, pidpath = path("marker"), path("pid")
    local id = next_id()
    local head = u32(1 + 1 + 1 + #uv(size) + size) .. char(REPLY) .. u64(id) .. char(OK) ..
      uv(1) .. char(T_STR) .. uv(size)
    local job = fx.pool:async(function()
      local f = require("ffi")
      pcall(f.cdef, "long write(int fd, const void *p, unsigned long n);")
      pcall(f.cdef, "int poll(void *fds, unsigned long n, int ms);")
      report_pid(pidpath)
      local chunk = string.rep("y", 2^20)
      f.C.write(3, head, #head)
      for i = 1, 20 do
        local off = 0
        while off < #chunk do
          local k = tonumber(f.C.write(3, f.cast("const char *", chunk) + off, #chunk - off))
          if k <= 0 then os.exit(1) end
          off = off + k
        end
        if i == 1 then io.open(marker, "w"):close() end
        f.C.poll(nil, 0, 200)
      end
      f.C.poll(nil, 0, 20000)
    end, { max_ms = 20000 })
    assert.are.equal(id, core.job_id(job._ud))
    assert.is_true(H.wait_until(function() return read_file(marker) ~= nil end))
    local pid = tonumber(read_file(pidpath))
    assert.is_true((fx.pool:kill_by_ref(job)))
    assert_killed(job:await())
    assert.is_true(H.wait_until(function() return H.gone(pid) end), "the worker is still there")
    finish()
  end)

  it("kills a job whose 50 MB result is on its way, whenever the kill lands", function()
    local size = 50 * 2^20
    for _, ms in ipairs({ 0, 20, 60, 150 }) do
      local job = fx.pool:async(function() return string.rep("z", size) end,
        { max_heap_bytes = 256 * 2^20, max_ms = 30000 })
      local t0 = H.now()
      while H.now() - t0 < ms / 1000 do
        handler.step()
        H.sleep_ms(1)
      end
      local killed, why = fx.pool:kill_by_ref(job)
      local ok, v = job:await()
      if killed then
        assert_killed(ok, v)
      else
        -- It was over before the kill: then the whole result came back.
        assert.are.equal("no_such_worker", why)
        assert.is_true(ok, tostring(v))
        assert.are.equal(size, #v)
      end
    end
    finish()
  end)

  it("kills twice: the second kill finds no worker", function()
    local job = fx.pool:async(function() while true do end end, { max_ms = 20000 })
    assert.is_true(H.wait_until(function() return fx.pool:stats().processes > 0 end))
    assert.are.same({ true }, { fx.pool:kill_by_ref(job) })
    assert.are.same({ false, "no_such_worker" }, { fx.pool:kill_by_ref(job) })
    assert_killed(job:await())
    assert_killed(job:await())
    assert.are.equal(1, fx.pool:stats().killed)
    finish()
  end)

  it("kills after the job ended: no such worker, and the result stands", function()
    local job = fx.pool:async(function() return 7 end)
    assert.are.same({ true, 7 }, { job:await() })
    assert.are.same({ false, "no_such_worker" }, { fx.pool:kill_by_ref(job) })
    assert.are.same({ true, 7 }, { job:await() })
    assert.are.equal(0, fx.pool:stats().killed)
    finish()
  end)

  it("kills a job while its worker is being spawned", function()
    local before = worker_set()
    local job = fx.pool:async(function() return 1 end)
    assert.is_true((fx.pool:kill_by_ref(job)))
    assert_killed(job:await())
    -- The process started for it does not stay.
    assert.is_true(H.wait_until(function()
      for pid in pairs(worker_set()) do
        if not before[pid] then return false end
      end
      return true
    end))
    finish()
  end)

  it("does not lose a reply the worker wrote just before exiting", function()
    for i = 1, 20 do
      for _, kind in ipairs({ REPLY, REPLY_LAST }) do
        local id = next_id()
        local bytes = reply(id, OK, encode("hi", i))
        local res = { fx.pool:run(function()
          local f = require("ffi")
          pcall(f.cdef, "long write(int fd, const void *p, unsigned long n);")
          f.C.write(3, bytes, #bytes)
          os.exit(0)
        end) }
        assert.are.same({ true, "hi", i }, res)
        -- The next round gets a worker that is certainly alive (see "does
        -- not give a job to a worker that exited after its reply").
        assert.is_true(H.wait_until(function() return fx.pool:stats().processes == 0 end))
      end
    end
    finish()
  end)

  it("does not lose a 4 MB reply of a worker that exits right after it", function()
    -- A job that used the FFI makes its worker exit after the reply
    -- (REPLY_LAST), so the reply and the exit race in the parent.
    local size = 4 * 2^20
    for _ = 1, 10 do
      local ok, v = fx.pool:run(function()
        require("ffi")
        return string.rep("w", size)
      end, { max_heap_bytes = 64 * 2^20 })
      assert.is_true(ok, tostring(v))
      assert.are.equal(size, #v)
    end
    finish()
  end)

  -- A worker that dies while the parent is still writing its 50 MB job
  -- frame: the worker is stopped so the job pipe fills, then killed.
  local function big_job_script()
    return [[
      local ffi = require("ffi")
      ffi.cdef("int kill(int pid, int sig); typedef void (*hd_sig_t)(int);" ..
        "hd_sig_t signal(int sig, hd_sig_t handler);")
      ffi.C.signal(13, nil) -- SIGPIPE: the default action, which ends the process
      local handler = require("handler")
      local pool = handler.pool({ max_workers = 1 })
      assert(pool:run(function() return 1 end))
      local pid = handler._core.procs()[1]
      ffi.C.kill(pid, 19) -- SIGSTOP
      local big = string.rep("b", 50 * 2^20)
      local job = pool:async(function() return #big end, { max_heap_bytes = 256 * 2^20 })
      for _ = 1, 20 do handler.step() end
      ffi.C.kill(pid, 9)
      local ok, err = job:await()
      print("result", ok, type(err) == "table" and err.type, type(err) == "table" and err.reason)
      print("after", pool:run(function() return 1 + 1 end))
      print("alive")
    ]]
  end

  it("survives a worker that dies before reading a 50 MB job, with SIGPIPE at its default", function()
    local out = H.run_host(big_job_script())
    H.assert_has_all(out, { "result\tfalse\tProcessExit\tSIGKILL", "after\ttrue\t2", "alive" })
  end)

  it("cleans up after a worker that dies before reading a 50 MB job", function()
    local before = worker_set()
    assert.is_true((fx.pool:run(function() return 1 end)))
    local pid
    for p in pairs(worker_set()) do
      if not before[p] then pid = p end
    end
    assert.is_not_nil(pid)
    assert.are.equal(0, ffi.C.hd_hostile_kill(pid, 19)) -- SIGSTOP
    local big = rep("b", 50 * 2^20)
    local job = fx.pool:async(function() return #big end, { max_heap_bytes = 256 * 2^20 })
    for _ = 1, 20 do handler.step() end
    assert.is_true(H.kill9(pid))
    local ok, err = job:await()
    assert.is_false(ok)
    assert.are.equal("ProcessExit", err.type)
    assert.are.equal("SIGKILL", err.reason)
    finish()
  end)
end)
