-- serve_spec.lua: `handler serve`, consumers of a Redis stream. Three of
-- them share 2,000 entries, some poisoned (hang, OOM, crash, raise); one is
-- killed with SIGKILL mid-run, one stopped with SIGTERM, and redis-server
-- is killed and restarted: every entry ends with exactly one final outcome
-- in the results or the dead-letter stream, nothing stays pending, and no
-- consumer leaves a process behind. Then a script served, the stats, and
-- the command's usage.
local H = require("spec.support.helpers")
local redis = require("spec.support.redis")

local usable, missing = redis.available()
if not usable then
  describe("handler serve", function()
    pending(missing .. " (tools/setup installs it)")
  end)
  return
end
local nginx = require("spec.support.nginx")
local handler = require("handler")
local remote_mod = require("handler.remote")

local format = string.format
local SIGKILL, SIGTERM, SIGUSR1 = 9, 15, 10

-- Runs the command to its end; exit status, output.
local function serve_cmd(args)
  local dir = H.tmpdir()
  local out = dir .. "/out"
  os.execute(H.lua_env() .. " timeout -s KILL 30 luajit bin/handler serve " .. args .. " > "
    .. H.shell_quote(out) .. " 2>&1; echo $? > " .. H.shell_quote(dir .. "/status"))
  local status, text = tonumber(H.read_file(dir .. "/status")), H.read_file(out) or ""
  H.rm_r(dir)
  return status, text
end

-- The entry kinds, by number: the poisoned ones, and the rest.
local function kind_of(i)
  local k = i % 100
  if k == 7 then return "hang" end
  if k == 17 then return "oom" end
  if k == 27 then return "crash" end
  if k == 37 then return "raise" end
  return "ok"
end

local function job_of(kind)
  if kind == "hang" then
    return function() while true do end end, { max_ms = 200 }
  elseif kind == "oom" then
    return function() local t = {} for i = 1, 1e7 do t[i] = { i } end end,
      { max_heap_bytes = 256 * 1024 }
  elseif kind == "crash" then
    return function() require("ffi").cast("int *", 0)[0] = 1 end, {}
  elseif kind == "raise" then
    return function(i) error("bad entry " .. i, 0) end, {}
  end
  -- A few ms of work, so that the run lasts long enough to be interrupted.
  return function(i)
    local t = os.clock() + 0.003
    while os.clock() < t do end
    return i * 2
  end, {}
end

describe("handler serve", function()
  after_each(function() redis.stop_all() end)

  it("gives 2,000 entries one outcome each through SIGKILL, SIGTERM and a Redis restart", function()
    local srv = redis.start{ persist = true }
    local N = 2000
    -- The entries, written before any consumer runs (the group starts at
    -- the stream's beginning).
    local producer = handler.remote{ redis = srv.addr, stream = "jobs" }
    local kind_by_id, want = {}, {}
    for i = 1, N do
      local fn, opts = job_of(kind_of(i))
      opts.args = { i }
      local job = assert(producer:async(fn, opts))
      kind_by_id[job.id] = kind_of(i)
      want[job.id] = i
    end
    producer:close()
    local common = { "--stream", "jobs", "-j", "2", "--retries", "2", "--visibility-ms", "1000",
      "--max-ms", "5000", "--stats-key", "serve-stats", "--no-progress" }
    local function start(name)
      local args = { "--consumer", name }
      for _, a in ipairs(common) do args[#args + 1] = a end
      return redis.consumer(srv, args)
    end
    local a, b, c = start("a"), start("b"), start("c")

    local function outcomes()
      return tonumber(srv:try("XLEN", "jobs:results") or 0) + tonumber(srv:try("XLEN", "jobs:dead") or 0)
    end
    local function reach(n)
      assert.is_true(H.wait_until(function() return outcomes() >= n end, 60),
        format("only %d outcomes\n-- a:\n%s-- b:\n%s-- c:\n%s", outcomes(), a:output(),
          b:output(), c:output()))
    end

    -- SIGKILL: a's held entries stay pending until the others claim them.
    reach(300)
    local a_ids = a:ids()
    assert.is_true(#a_ids >= 2, "a's supervisor and workers: " .. redis.describe(a_ids))
    a:signal(SIGKILL)
    assert.are.equal("signal 9", a:wait(10))
    -- What a held when it died stays pending under its name, for the
    -- others to claim (usually its whole window; none if it died between
    -- two reads).
    local a_held = srv:call("XPENDING", "jobs", "handler", "-", "+", "1000", "a")
    a_held = type(a_held) == "table" and #a_held or 0
    assert.is_true(nginx.wait_for(function() return #redis.living(a_ids) == 0 end, 10),
      "left by the killed consumer: " .. redis.describe(redis.living(a_ids)))

    -- SIGTERM: b finishes what it holds, writes, acknowledges and exits 0.
    reach(700)
    local b_ids = b:ids()
    b:signal(SIGTERM)
    assert.are.equal("exit 0", b:wait(20), b:output())
    assert.matches("consumer b stopped", b:output(), 1, true)
    assert.is_true(nginx.wait_for(function() return #redis.living(b_ids) == 0 end, 10),
      "left by the stopped consumer: " .. redis.describe(redis.living(b_ids)))

    -- Redis dies and comes back; the append-only file (fsynced at every
    -- write) has all it acknowledged.
    reach(1100)
    srv:restart(SIGKILL)

    -- c does the rest, claiming a's entries after the visibility timeout.
    assert.is_true(H.wait_until(function()
      return outcomes() >= N and srv:pending("jobs") == 0
    end, 60), format("%d outcomes, %d pending\n-- c:\n%s", outcomes(), srv:pending("jobs"),
      c:output()))

    -- Exactly one final outcome per entry, each as its kind says.
    local seen = {}
    local function check(e, dead)
      local id = e.fields.id
      assert.is_not_nil(kind_by_id[id], "an outcome for an unknown entry " .. tostring(id))
      assert.is_nil(seen[id], "two outcomes for " .. tostring(id))
      seen[id] = true
      local kind = kind_by_id[id]
      local ok, v = remote_mod.decode_outcome(e.fields.ok, e.fields.value)
      if kind == "ok" then
        assert.is_false(dead, id)
        assert.are.same({ true, want[id] * 2 }, { ok, v })
      elseif kind == "hang" then
        assert.is_true(dead, id)
        assert.are.equal("Timeout", v.type)
      elseif kind == "crash" then
        assert.is_true(dead, id)
        assert.are.same({ "ProcessExit", "SIGSEGV" }, { v.type, v.reason })
        -- The dead letter carries the entry, to send again.
        assert.is_not_nil(e.fields.fn)
      elseif kind == "oom" then
        assert.is_false(dead, id)
        assert.are.same({ false, "OOM" }, { ok, v.type })
      else
        assert.is_false(dead, id)
        assert.are.same({ false, "ProcessExit", "bad entry " .. want[id] },
          { ok, v.type, v.reason })
      end
    end
    for _, e in ipairs(srv:entries("jobs:results")) do check(e, false) end
    for _, e in ipairs(srv:entries("jobs:dead")) do check(e, true) end
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    assert.are.equal(N, n)

    -- The counters: a stats line on SIGUSR1, and every consumer's in the hash.
    c:signal(SIGUSR1)
    assert.is_true(nginx.wait_for(function()
      return c:output():find("handler serve: c: %d+ done") ~= nil
    end, 10), c:output())
    local stats = redis.fields(srv:call("HGETALL", "serve-stats"))
    assert.is_not_nil(stats.a)
    assert.is_not_nil(stats.b)
    assert.matches("^%d+ done %(%d+ ok, %d+ failed, %d+ dead, 0 refused%)", stats.c)
    assert.matches("connected again", c:output(), 1, true)
    -- The killed consumer's entries were claimed (XAUTOCLAIM) by the others.
    local claimed = tonumber(stats.b:match("(%d+) claimed")) + tonumber(stats.c:match("(%d+) claimed"))
    if a_held > 0 then
      assert.is_true(claimed >= 1, a_held .. " held by a\n" .. stats.b .. "\n" .. stats.c)
    end

    local c_ids = c:ids()
    assert.are.equal("exit 0", c:stop())
    assert.is_true(nginx.wait_for(function() return #redis.living(c_ids) == 0 end, 10),
      redis.describe(redis.living(c_ids)))
  end)

  it("writes one outcome when a paused consumer's entry was taken over and run again", function()
    local srv = redis.start()
    local args = { "--stream", "slow", "-j", "1", "--visibility-ms", "500", "--no-progress" }
    local x = redis.consumer(srv, { "--consumer", "x", unpack(args) })
    local producer = handler.remote{ redis = srv.addr, stream = "slow" }
    finally(function()
      x:signal(18) -- SIGCONT, if the test stopped before it did
      producer:close()
    end)
    local job = assert(producer:async(function()
      local t = os.clock() + 0.8
      while os.clock() < t do end
      return "ran"
    end))
    -- x holds it; x stops answering (SIGSTOP), its worker runs on.
    assert.is_true(nginx.wait_for(function()
      local p = srv:try("XPENDING", "slow", "handler", "-", "+", 10)
      return type(p) == "table" and p[1] ~= nil and p[1][2] == "x"
    end, 10))
    x:signal(19)
    -- y takes it over once it has been idle for the visibility timeout,
    -- runs it again, and writes its outcome.
    local y = redis.consumer(srv, { "--consumer", "y", unpack(args) })
    assert.are.same({ true, "ran" }, { redis.await(job) })
    assert.are.equal("y", redis.fields(srv:call("XRANGE", "slow:results", "-", "+")[1][2]).consumer)
    -- x comes back with its own result: the script writes nothing.
    x:signal(18)
    assert.is_true(nginx.wait_for(function()
      x:signal(SIGUSR1)
      H.sleep_ms(100)
      return x:output():find("1 duplicates", 1, true) ~= nil
    end, 15), x:output())
    assert.are.equal(1, tonumber(srv:call("XLEN", "slow:results")))
    assert.are.equal(0, srv:pending("slow"))
    assert.are.equal("exit 0", x:stop())
    assert.are.equal("exit 0", y:stop())
  end)

  it("serves a script: each entry's input is the argument of its map", function()
    local srv = redis.start()
    local dir = H.tmpdir()
    finally(function() H.rm_r(dir) end)
    H.write_file(dir .. "/s.lua", [[
      return {
        init = function() PREFIX = "rec:" end,
        map = function(rec) return PREFIX .. rec.name, #rec.list end,
      }
    ]])
    local c = redis.consumer(srv, { dir .. "/s.lua", "--stream", "recs", "-j", "1",
      "--no-progress" })
    local r = handler.remote{ redis = srv.addr, stream = "recs" }
    finally(function() r:close() end)
    local job = assert(r:submit({ name = "x", list = { 1, 2, 3 } }))
    assert.are.same({ true, "rec:x", 3 }, { redis.await(job) })
    -- A closure sent to a script's consumer is refused.
    local ok, err = redis.await(r:async(function() return 1 end))
    assert.is_false(ok)
    assert.matches("entry has no input field (this consumer serves a script)", err.message, 1, true)
    assert.are.equal("exit 0", c:stop())
  end)

  it("stops at once when idle, on SIGTERM, and exits 0", function()
    local srv = redis.start()
    local c = redis.consumer(srv, { "--stream", "idle", "-j", "1", "--no-progress" })
    assert.is_true(nginx.wait_for(function()
      return c:output():find("reads idle", 1, true) ~= nil
    end, 10), c:output())
    local t0 = H.now()
    c:signal(SIGTERM)
    assert.are.equal("exit 0", c:wait(10))
    assert.is_true(H.now() - t0 < 5)
    assert.matches("consumer .* stopped: 0 done", c:output())
  end)

  it("waits for Redis when it is not there yet, and then serves", function()
    local port = nginx.free_port()
    local c = redis.consumer({ addr = "127.0.0.1:" .. port }, { "--stream", "later", "-j", "1",
      "--no-progress" })
    assert.is_true(nginx.wait_for(function()
      return c:output():find("trying again", 1, true) ~= nil
    end, 10), c:output())
    local srv = redis.start{ port = port }
    local r = handler.remote{ redis = srv.addr, stream = "later" }
    finally(function() r:close() end)
    assert.are.same({ true, 7 }, { redis.await(r:async(function() return 7 end)) })
    assert.are.equal("exit 0", c:stop())
  end)

  it("says what is wrong with its arguments, and exits 2", function()
    local cases = {
      { "--redis 127.0.0.1:1", "handler serve: no --stream NAME given" },
      { "--stream s --redis 'a b'", "handler serve: --redis: expected HOST:PORT, got a b" },
      { "--stream s --retries x", "--retries: expected a whole number, got x" },
      { "--stream s --sandbox --sandbox-each", "--sandbox and --sandbox-each: choose one" },
    }
    for _, c in ipairs(cases) do
      local status, out = serve_cmd(c[1])
      assert.are.equal(2, status, c[1])
      assert.matches(c[2], out, 1, true)
    end
    local status, out = serve_cmd("--help")
    assert.are.equal(0, status)
    assert.matches("usage: handler serve", out, 1, true)
  end)
end)
