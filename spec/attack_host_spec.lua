-- attack_host_spec.lua: what the host guarantees against a hostile worker
-- and around its own life: replies cost memory in proportion to their size,
-- results are plain data, a forked host starts afresh, and a host that
-- calls handler while its Lua state closes fails cleanly. SECURITY.md names
-- these cases.
--
-- Anything that could kill or wedge the host runs in a disposable host
-- process (host() below, like H.run_host, but with the exit status).
local handler = require("handler")
local H = require("spec.support.helpers")

local core = handler._core
local encode, decode = core.encode, core.decode
local char, rep, floor, concat, format = string.char, string.rep, math.floor, table.concat,
  string.format
local tostring, tonumber, type, pcall, ipairs, select, getmetatable, setmetatable =
  tostring, tonumber, type, pcall, ipairs, select, getmetatable, setmetatable

---------------------------------------------------------------------------
-- Disposable hosts.

-- Runs `script` (Lua source) in a new luajit process with this build of
-- handler on its paths; returns everything it printed and its exit status
-- (as the shell reports it: 128 + n for a death by signal n). Killed after
-- 60 s.
local function host(script)
  local dir = H.tmpdir()
  local path, out = dir .. "/host.lua", dir .. "/out"
  H.write_file(path, script)
  os.execute(H.lua_env() .. " timeout -s KILL 60 luajit " .. H.shell_quote(path) .. " > "
    .. H.shell_quote(out) .. " 2>&1; echo \"exit status $?\" >> " .. H.shell_quote(out))
  local text = H.read_file(out) or ""
  H.rm_r(dir)
  return text, tonumber(text:match("exit status (%d+)\n$"))
end

---------------------------------------------------------------------------
-- A handler call while the Lua state closes.

describe("a host whose Lua state closes", function()
  -- The finalizers of lua_close run after the package library has
  -- dlclosed core.so (its handle is older than anything the module made).
  local cases = {
    { "calls handler.run from a finalizer made before the module: a clean error",
      before = true, ending = "",
      expect = { "gc\tfalse\t", "handler: the module has been shut down" } },
    { "calls handler.run from a finalizer at os.exit(0, true): a clean error",
      before = true, ending = "os.exit(0, true)",
      expect = { "gc\tfalse\t", "handler: the module has been shut down" } },
    { "calls handler.run from a finalizer made after the module: no crash",
      before = false, ending = "", expect = { "gc\t" } },
    { "calls handler.run from a finalizer made after the module, at os.exit(0, true): no crash",
      before = false, ending = "os.exit(0, true)", expect = { "gc\t" } },
  }
  for _, c in ipairs(cases) do
    it(c[1], function()
      local make = [[
        local p = newproxy(true)
        getmetatable(p).__gc = function()
          print("gc", pcall(handler.run, function() return 2 end))
          io.stdout:flush()
        end
        _G.keep = p
      ]]
      local script = "local handler\n" .. (c.before and make or "") ..
        "handler = require('handler')\n" ..
        "print('first', handler.run(function() return 1 end))\n" ..
        (c.before and "" or make) ..
        "local job = handler.default_pool():async(function() return 3 end)\n" ..
        "print('job', job:await())\n" ..
        "io.stdout:flush()\n" .. c.ending .. "\n"
      local out, status = host(script)
      assert.are.equal(0, status, out)
      H.assert_has_all(out, { "first\ttrue\t1", "job\ttrue\t3" })
      H.assert_has_all(out, c.expect)
      -- When the call ran at all, it ran whole: a result, or the clean error.
      local gc_line = out:match("gc\t[^\n]*")
      assert.is_truthy(gc_line, out)
      assert.is_truthy(gc_line:find("gc\ttrue\ttrue\t2", 1, true) or
        gc_line:find("handler: the module has been shut down", 1, true), gc_line)
    end)
  end

  it("keeps core.so mapped when the package library closes it", function()
    -- Linked with -z nodelete: dlclose leaves the code of the module in
    -- place for the finalizers that still reach it.
    local f = io.popen("readelf -d " .. H.shell_quote(core.worker_path:gsub("handler%-worker$",
      "core.so")) .. " 2>/dev/null")
    local text = f:read("*a")
    f:close()
    if text == "" then
      pending("readelf is not installed")
      return
    end
    assert.matches("NODELETE", text, 1, true)
  end)
end)

---------------------------------------------------------------------------
-- The wire format (src/common/wire.h, codec_int.h), to play a hostile worker.

local REPLY = 2
local OK = 0
local T_TRUE, T_NUM, T_STR, T_TABLE, T_TABLE_MT, T_END = 2, 3, 4, 5, 6, 7

local W = require("spec.support.wire")
local uv, str = W.uv, W.str

local num = W.num

local function reply_frame(id, msg)
  return W.reply(id, OK, msg)
end

-- The id the next job submitted in this process gets (ids count up by one
-- per job submitted).
local function next_id(pool)
  local probe = pool:async(function() end)
  local id = core.job_id(probe._ud)
  assert.is_true((probe:await()))
  return id + 1
end

-- A job that writes `bytes` on its reply pipe, then exits: the host
-- reads the reply it finds there before it learns of the exit.
local function send_raw(bytes)
  return function()
    local f = require("ffi")
    pcall(f.cdef, "long write(int fd, const void *p, unsigned long n);")
    local p, off = f.cast("const char *", bytes), 0
    while off < #bytes do
      local n = tonumber(f.C.write(3, p + off, #bytes - off))
      if n <= 0 then break end
      off = off + n
    end
    os.exit(0)
  end
end

-- The host's resident set, in bytes (for messages).
local function rss()
  local s = H.read_file("/proc/self/statm") or ""
  local pages = tonumber(s:match("^%d+ (%d+)")) or 0
  return pages * 4096
end

-- Runs `fn` with the collector stopped, keeping what it returns; returns
-- those results packed and the growth of the Lua heap and of the resident
-- set meanwhile, in bytes.
local function growth_of(fn)
  collectgarbage()
  collectgarbage()
  collectgarbage("stop")
  local heap0, rss0 = collectgarbage("count") * 1024, rss()
  local r = H.pack(fn())
  local heap1, rss1 = collectgarbage("count") * 1024, rss()
  collectgarbage("restart")
  return r, heap1 - heap0, rss1 - rss0
end

describe("a reply's size hints", function()
  local pool

  setup(function()
    H.warm()
    pool = handler.pool({ max_workers = 2 })
  end)

  teardown(function()
    pool:close()
  end)

  -- A megabyte of padding: what a lying hint claims to be able to fill.
  local pad = rep("p", 2^20 + 64)

  -- Each message is small next to what its hints claim; the reply is
  -- decoded as it would be, and the host's Lua heap may grow by what the
  -- values hold and CX_HINT_BYTES_PER_BYTE per byte at most.
  local BOUND_PER_BYTE, SLACK = 6, 256 * 1024
  local cases = {
    { "a hash part of 2^63 slots claimed by one entry",
      msg = function()
        return uv(1) .. char(T_TABLE) .. uv(0) .. uv(2^63) .. char(T_TRUE) .. str(pad) ..
          char(T_END)
      end,
      check = function(v) return type(v) == "table" and v[true] == pad end },
    { "an array part of 2^63 slots claimed by one entry",
      msg = function()
        return uv(1) .. char(T_TABLE) .. uv(2^63) .. uv(0) .. char(T_NUM) .. num(1) .. str(pad)
          .. char(T_END)
      end,
      check = function(v) return type(v) == "table" and v[1] == pad end },
    { "150 nested tables, each claiming ten million hash slots over the same bytes",
      msg = function()
        local m = { uv(1) }
        for _ = 1, 150 do m[#m + 1] = char(T_TABLE) .. uv(0) .. uv(1e7) .. char(T_TRUE) end
        m[#m + 1] = str(pad)
        for _ = 1, 150 do m[#m + 1] = char(T_END) end
        return concat(m)
      end,
      check = function(v)
        for _ = 1, 150 do
          if type(v) ~= "table" then return false end
          v = v[true]
        end
        return v == pad
      end },
    { "7000 tables, each claiming ten million hash slots",
      msg = function()
        local m = { uv(7001) }
        for _ = 1, 7000 do m[#m + 1] = char(T_TABLE) .. uv(0) .. uv(1e7) .. char(T_END) end
        m[#m + 1] = str(pad)
        return concat(m)
      end,
      check = function(_, r) return r.n == 7002 and r[7002] == pad end },
  }
  for _, c in ipairs(cases) do
    it("costs the host memory in proportion to the reply: " .. c[1], function()
      local msg = c.msg()
      local job = send_raw(reply_frame(next_id(pool), msg))
      local r, heap, res = growth_of(function() return pool:run(job, { max_ms = 10000 }) end)
      assert.is_true(r[1], tostring(r[2]))
      assert.is_true(c.check(r[2], r), "the values came back wrong")
      assert(heap <= BOUND_PER_BYTE * #msg + SLACK, format(
        "a %d byte reply grew the host's Lua heap by %d bytes (%.1f per byte); resident set +%d",
        #msg, heap, heap / #msg, res))
      -- core.decode, the same decoder on the same bytes, in this process.
      local d, dheap = growth_of(function() return decode(msg) end)
      assert(dheap <= BOUND_PER_BYTE * #msg + SLACK, format(
        "decoding %d bytes grew the Lua heap by %d bytes (%.1f per byte)", #msg, dheap,
        dheap / #msg))
      assert.is_true(d.n >= 1)
    end)
  end
end)

---------------------------------------------------------------------------
-- Results are plain data: what a metatable made of data can do to the host.

describe("a result's metatable", function()
  local pool

  setup(function()
    H.warm()
    pool = handler.pool({ max_workers = 2 })
  end)

  teardown(function()
    pool:close()
  end)

  local function run(fn)
    local ok, v = pool:run(fn)
    assert.is_true(ok, tostring(v))
    assert.are.equal("table", type(v))
    return v
  end

  it("cannot make a result weak (__mode)", function()
    local v = run(function()
      return setmetatable({ {}, k = {} }, { __mode = "kv" })
    end)
    collectgarbage()
    collectgarbage()
    assert.are.equal("table", type(v[1]), "the result lost its entries to the collector")
    assert.are.equal("table", type(v.k))
    assert.is_nil(getmetatable(v).__mode)
  end)

  it("cannot make a result weak through a metatable shared with a value", function()
    local v = run(function()
      local mt = { __mode = "v" }
      return { mt = mt, obj = setmetatable({ {} }, mt) }
    end)
    collectgarbage()
    collectgarbage()
    assert.are.equal("table", type(v.obj[1]))
    assert.are.equal(v.mt, getmetatable(v.obj))
    assert.is_nil(v.mt.__mode)
  end)

  it("cannot protect a result (__metatable)", function()
    local v = run(function()
      return setmetatable({}, { __metatable = "locked", kind = "point" })
    end)
    assert.are.equal("table", type(getmetatable(v)))
    assert.are.equal("point", getmetatable(v).kind)
    assert.is_true(pcall(setmetatable, v, nil), "the host cannot change the result's metatable")
  end)

  it("cannot make tostring raise (__tostring that is not a function)", function()
    local v = run(function()
      return { a = setmetatable({}, { __tostring = "x" }), b = setmetatable({}, { __tostring = {} }) }
    end)
    assert.is_true(pcall(tostring, v.a))
    assert.is_true(pcall(tostring, v.b))
    assert.matches("^table: ", tostring(v.a))
  end)

  it("cannot make #, ==, <, .. or a call behave otherwise than on a plain table", function()
    local ok, a, b = pool:run(function()
      local mt = { __len = 5, __eq = "x", __lt = 1, __le = true, __concat = "c", __call = {},
        __unm = 1, __add = 2, __gc = "g", __pairs = "p", __ipairs = "i" }
      return setmetatable({ 1, 2 }, mt), setmetatable({}, mt)
    end)
    assert.is_true(ok, tostring(a))
    assert.are.equal(2, #a)
    -- Two tables with the same __eq: == called the string and raised.
    local eq_ok, eq = pcall(function() return a == b end)
    assert.is_true(eq_ok, "comparing two results raised: " .. tostring(eq))
    assert.is_false(eq)
    local mt = getmetatable(a)
    for _, k in ipairs({ "__len", "__eq", "__lt", "__le", "__concat", "__call", "__unm", "__add",
      "__gc", "__pairs", "__ipairs" }) do
      assert.is_nil(mt[k], k)
    end
  end)

  it("cannot reach the host's string functions through a string __index", function()
    -- A missing field of the result would be looked up in the string, whose
    -- own metatable hands out the host's string library.
    local v = run(function()
      return setmetatable({}, { __index = "abc", __newindex = 7 })
    end)
    assert.is_nil(v.rep, "reading a field of the result gave string.rep")
    assert.is_nil(v.format)
    assert.is_true(pcall(function() v.x = 1 end))
    assert.are.equal(1, rawget(v, "x"))
  end)

  it("keeps __index and __newindex tables, and fields that are not metamethods", function()
    local v = run(function()
      local store = {}
      return setmetatable({}, { __index = { x = 1 }, __newindex = store, kind = "point",
        __name = "Point" }), store
    end)
    assert.are.equal(1, v.x)
    assert.are.equal("point", getmetatable(v).kind)
    assert.are.equal("Point", getmetatable(v).__name)
    v.y = 2
    assert.is_nil(rawget(v, "y"))
  end)

  it("is plain data even when it refers to a table still being read", function()
    -- Raw bytes: table T holds C, whose metatable is T itself, and only
    -- then T's own __mode and __tostring fields: the metatable is used
    -- before it is complete.
    local msg = uv(1) .. char(T_TABLE) .. uv(0) .. uv(3) ..
      str("c") .. char(T_TABLE_MT) .. uv(0) .. uv(0) .. char(T_END) .. char(8) .. uv(0) ..
      str("__mode") .. str("kv") ..
      str("__tostring") .. str("x") .. char(T_END)
    local t = decode(msg)
    assert.are.equal(t, getmetatable(t.c))
    assert.is_nil(t.__mode)
    assert.is_nil(t.__tostring)
    local ok, v = pool:run(send_raw(reply_frame(next_id(pool), msg)))
    assert.is_true(ok, tostring(v))
    collectgarbage()
    assert.are.equal(v, getmetatable(v.c))
    assert.is_nil(v.__mode)
    assert.is_true(pcall(tostring, v.c))
  end)
end)

---------------------------------------------------------------------------
-- A host that forks after handler started.

describe("a host that forks", function()
  -- What every script below starts with: the FFI declarations, the module,
  -- and helpers: fork() that flushes first, wait(pid) -> exit status,
  -- sup() -> the supervisor's pid, and job bodies.
  local prelude = [[
    local ffi = require("ffi")
    ffi.cdef[[
      int fork(void); int getpid(void); int waitpid(int pid, int *st, int opt);
      int setuid(unsigned uid); int setgid(unsigned gid); int setgroups(unsigned long n, const void *l);
      int poll(void *fds, unsigned long n, int ms);
    ]=]
    local handler = require("handler")
    local function fork()
      io.stdout:flush()
      return ffi.C.fork()
    end
    local function wait(pid)
      local st = ffi.new("int[1]")
      ffi.C.waitpid(pid, st, 0)
      return st[0]
    end
    local function sup() return handler._core.procs().supervisor end
    local function sleep_ms(ms) ffi.C.poll(nil, 0, ms) end
    -- A job returning its token, its pid, its parent's pid and its uid.
    local function who(token)
      return function()
        local f = io.open("/proc/self/status")
        local s = f:read("*a")
        f:close()
        return token, tonumber(s:match("\nPid:%s*(%d+)")), tonumber(s:match("\nPPid:%s*(%d+)")),
          tonumber(s:match("\nUid:%s*(%d+)"))
      end
    end
    -- Runs n jobs, each returning its own token; prints a line per process.
    local function batch(name, pool, n)
      local wrong, pids = 0, {}
      for i = 1, n do
        local ok, token, pid, ppid = pool:run(who(name .. i))
        if not ok or token ~= name .. i then
          wrong = wrong + 1
          print(name .. " wrong", i, ok, token)
        end
        if pid then pids[#pids + 1] = pid end
        if ppid ~= sup() then print(name .. " worker not under its supervisor", pid, ppid, sup()) end
      end
      print(name .. " batch", n - wrong, "of", n, "right; workers", table.concat(pids, " "))
      io.stdout:flush()
    end
  ]]
  prelude = prelude:gsub("%]=%]", "]" .. "]")

  -- The pids a script printed as "pids: a b c", all gone (or zombies of a
  -- dead parent) within 5 s.
  local function assert_all_gone(out)
    for line in out:gmatch("pids:([^\n]*)") do
      for pid in line:gmatch("%d+") do
        pid = tonumber(pid)
        assert.is_true(H.wait_until(function() return not H.alive(pid) end, 5),
          "process " .. pid .. " is left behind:\n" .. out)
      end
    end
  end

  it("gives the child its own supervisor and the right results, while the parent runs its own",
    function()
      local out, status = host(prelude .. [[
        local pool = handler.pool({ max_workers = 4 })
        assert(pool:run(function() return 1 end))
        local parent_sup = sup()
        local pid = fork()
        if pid == 0 then
          batch("child", pool, 60)
          print("child sup", sup(), "parent sup", parent_sup)
          print("pids:", sup(), table.concat(handler._core.procs(), " "))
          io.stdout:flush()
          os.exit(0, true)
        end
        batch("parent", pool, 60)
        print("status", wait(pid))
        print("parent sup", sup(), "before", parent_sup)
        batch("parent again", pool, 5)
        print("pids:", sup(), table.concat(handler._core.procs(), " "))
      ]])
      assert.are.equal(0, status, out)
      H.assert_has_all(out, { "child batch\t60\tof\t60\tright", "parent batch\t60\tof\t60\tright",
        "parent again batch\t5\tof\t5\tright", "status\t0" })
      assert.is_nil(out:find("wrong", 1, true), out)
      assert.is_nil(out:find("not under its supervisor", 1, true), out)
      local child_sup, parent_sup = out:match("child sup\t(%d+)\tparent sup\t(%d+)")
      assert.is_truthy(child_sup, out)
      assert.are_not.equal(child_sup, parent_sup)
      assert.matches("parent sup\t" .. parent_sup .. "\tbefore\t" .. parent_sup, out, 1, true)
      assert_all_gone(out)
    end)

  it("gives a job started before the fork, awaited in the child, a clean error", function()
    local out, status = host(prelude .. [[
      local pool = handler.pool({ max_workers = 1 })
      local job = pool:async(function()
        local t = os.clock() + 0.3
        while os.clock() < t do end
        return "parent's"
      end)
      local pid = fork()
      if pid == 0 then
        print("child done", job:done())
        local ok, err = job:await()
        print("child await", ok, type(err) == "table" and err.type, err and err.reason, tostring(err))
        print("child kill", pool:kill_by_ref(job))
        -- The pool's one slot is the parent's job's: not the child's.
        local s = pool:stats()
        print("child stats", s.running, s.queued, s.bytes_committed, s.processes, s.started)
        print("child run", pool:run(function() return "child's" end))
        os.exit(0, true)
      end
      print("parent await", job:await())
      print("status", wait(pid))
    ]])
    assert.are.equal(0, status, out)
    H.assert_has_all(out, {
      "child done\ttrue",
      "child await\tfalse\tProcessExit\tforked\tThe job was started in another process, before a fork",
      "child kill\tfalse\tno_such_worker",
      "child stats\t0\t0\t0\t0\t0",
      "child run\ttrue\tchild's",
      "parent await\ttrue\tparent's",
      "status\t0" })
  end)

  it("closes the child's copies of the parent's sockets at the fork", function()
    -- The child never calls handler and outlives the parent's idle worker:
    -- the worker must still see EOF when the parent retires it.
    local out, status = host(prelude .. [[
      local pool = handler.pool({ max_workers = 1, idle_ms = 100 })
      local _, _, worker = pool:run(who("x"))
      local pid = fork()
      if pid == 0 then
        sleep_ms(3000)
        os.exit(0)
      end
      local gone = false
      for _ = 1, 200 do
        handler.step()
        if pool:stats().processes == 0 then
          local f = io.open("/proc/" .. worker .. "/stat")
          local st = f and f:read("*a"):match("^.*%) (%S)")
          if f then f:close() end
          if st == nil or st == "Z" then gone = true break end
        end
        sleep_ms(10)
      end
      print("worker retired while the child lives", gone)
      -- The child's fd table holds nothing of handler's.
      local fds = {}
      local p = io.popen("ls -l /proc/" .. pid .. "/fd 2>/dev/null")
      for l in p:lines() do
        if l:find("socket:") or l:find("anon_inode") then fds[#fds + 1] = l:match("(%d+) %->") end
      end
      p:close()
      print("child sockets and anon inodes:", table.concat(fds, " "))
      ffi.cdef("int kill(int, int);")
      ffi.C.kill(pid, 9)
      wait(pid)
      print("pids:", sup(), worker)
    ]])
    assert.are.equal(0, status, out)
    H.assert_has_all(out, { "worker retired while the child lives\ttrue",
      "child sockets and anon inodes:\t\n" })
    assert_all_gone(out)
  end)

  it("runs the child's workers with the child's uid after it drops root", function()
    local id = io.popen("id -u")
    local uid = id:read("*l")
    id:close()
    if uid ~= "0" then
      pending("not root: the child cannot change its uid")
      return
    end
    local out, status = host(prelude .. [[
      assert(handler.run(function() return 1 end))
      local pid = fork()
      if pid == 0 then
        assert(ffi.C.setgroups(0, nil) == 0)
        assert(ffi.C.setgid(65534) == 0)
        assert(ffi.C.setuid(65534) == 0)
        local ok, token, wpid, ppid, uid = handler.run(who("c"))
        print("child job", ok, token, uid, ppid == sup())
        local f = io.open("/proc/" .. sup() .. "/status")
        print("child supervisor uid", f and f:read("*a"):match("\nUid:%s*(%d+)"))
        if f then f:close() end
        print("pids:", sup(), wpid)
        os.exit(0, true)
      end
      print("status", wait(pid))
      local ok, token, wpid, ppid, uid = handler.run(who("p"))
      print("parent job", ok, token, uid)
      print("pids:", sup(), wpid)
    ]])
    assert.are.equal(0, status, out)
    H.assert_has_all(out, { "child job\ttrue\tc\t65534\ttrue", "child supervisor uid\t65534",
      "status\t0", "parent job\ttrue\tp\t0" })
    assert_all_gone(out)
  end)
end)

describe("a host that runs sandboxed jobs", function()
  it("closes its /proc/<pid>/mem to its own non-sandboxed workers", function()
    -- Run as nobody, so that the kernel's check is the dumpable flag and
    -- not the root host's capabilities.
    local out = H.run_host_as_nobody([[
      local handler = require("handler")
      local ffi = require("ffi")
      ffi.cdef "int getpid(void); int prctl(int, unsigned long, unsigned long, unsigned long, unsigned long);"
      local host = ffi.C.getpid()
      local function peek()
        local f = io.open("/proc/" .. host .. "/mem")
        if f then f:close() end
        return f and "open" or "refused"
      end
      local plain = handler.pool({})
      print("before", select(2, plain:run(peek)), ffi.C.prctl(3, 0, 0, 0, 0))
      handler.pool({ sandbox = true })
      print("after", select(2, plain:run(peek)), ffi.C.prctl(3, 0, 0, 0, 0))
    ]])
    -- PR_GET_DUMPABLE (3): 1 before a sandboxed pool exists, 0 after.
    assert.matches("before\topen\t1", out, 1, true)
    assert.matches("after\trefused\t0", out, 1, true)
  end)
end)
