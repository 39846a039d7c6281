-- nginx_wait_spec.lua: handler inside a real nginx, under load: waiting
-- yields the request's light thread (fast requests stay fast while slow
-- jobs run), every job's outcome is right, phases that cannot yield raise
-- and pool:async works in all, budgets shared by all nginx workers hold
-- and survive a crashed or reloaded worker, values of nginx's stay in
-- nginx, and a killed supervisor is replaced. Skipped, saying why, when
-- nginx or its Lua module is missing.
local nginx = require("spec.support.nginx")
local http = require("spec.support.http")
local H = require("spec.support.helpers")

local format = string.format

local available, missing = nginx.available()
if not available then
  describe("waiting inside nginx", function()
    pending("skipped: " .. missing)
  end)
  return
end

local INIT = [[
local handler = require("handler")
handler.pool{ name = "jobs", max_workers = 16 }
]]

-- The harness's job locations, and /slow: a job that sleeps `ms` (jobs
-- outside the sandbox have the FFI).
local LOCATIONS = nginx.JOB_LOCATIONS .. [[
  location = /fast { content_by_lua_block { ngx.print("fast") } }
  location = /slow {
    content_by_lua_block {
      local ms = tonumber(ngx.var.arg_ms) or 500
      local ok, v = require("handler").pools.jobs:run(function()
        local ffi = require("ffi")
        pcall(ffi.cdef, "int poll(void *fds, unsigned long n, int ms);")
        ffi.C.poll(nil, 0, ms)
        return "slow"
      end, { max_ms = 10000 })
      ngx.print(tostring(ok), " ", tostring(v))
    }
  }
]]

local function start(n, extra)
  local opts = { workers = n, init = INIT, server = LOCATIONS }
  for k, v in pairs(extra or {}) do opts[k] = v end
  if extra and extra.server then opts.server = LOCATIONS .. extra.server end
  return nginx.start(opts)
end

local function load(srv, requests, concurrency)
  local r = http.load({ port = srv.port, requests = requests, concurrency = concurrency,
    timeout_ms = 60000 })
  assert(#r.failed == 0, "failed:\n" .. http.describe_failures(r.failed) .. "\n" .. srv:error_log())
  return r
end

local function latencies_of(results, path)
  local out = {}
  for _, o in ipairs(results) do
    if o.path == path then out[#out + 1] = o.latency_us end
  end
  return out
end

describe("waiting inside nginx", function()
  after_each(nginx.stop_all)

  it("keeps fast requests on the same worker fast while 500 ms jobs run", function()
    local srv = start(1)
    finally(function() srv:stop() end)
    srv:get_ok("/run")
    local idle = load(srv, { { path = "/fast", count = 200 } }, 4)
    local idle_p99 = http.percentile(idle.latencies, 99)
    -- Eight 500 ms jobs first, then 200 fast requests on the other four
    -- connections, all while the jobs run.
    local t0 = H.now()
    local busy = load(srv, { { path = "/slow?ms=500", count = 8 } , { path = "/fast", count = 200 } }, 12)
    local took = H.now() - t0
    local fast = latencies_of(busy.results, "/fast")
    local busy_p99 = http.percentile(fast, 99)
    for _, o in ipairs(busy.results) do
      assert.are.equal(o.path == "/fast" and "fast" or "true slow", o.body)
    end
    -- Blocking, each fast request would wait for the jobs ahead of it:
    -- 500 ms at least. Yielding, it is served as if nothing ran.
    assert(busy_p99 < idle_p99 + 100000, format("fast requests: p99 %.1f ms while jobs ran, %.1f ms idle",
      busy_p99 / 1000, idle_p99 / 1000))
    -- The eight jobs ran at once, not one after the other (4 s).
    assert(took < 2.5, format("eight 500 ms jobs took %.2f s", took))
    print(format("\n[nginx] fast requests: p99 %.2f ms idle, %.2f ms while eight 500 ms jobs ran",
      idle_p99 / 1000, busy_p99 / 1000))
    srv:stop_clean()
  end)

  it("gives every job its own outcome under concurrent load, on two workers", function()
    local srv = start(2)
    finally(function() srv:stop() end)
    local requests = {}
    for n = 1, 20 do requests[#requests + 1] = { path = "/cause?kind=ok&n=" .. n } end
    for _, kind in ipairs({ "timeout", "oom", "segv", "error" }) do
      requests[#requests + 1] = { path = "/cause?kind=" .. kind, count = 5 }
    end
    local t0 = H.now()
    local r = load(srv, requests, 10)
    local want = { timeout = "Timeout|nil|Took more than 100ms to complete",
      oom = "OOM|nil|Process tried to use more than 65536 bytes of memory",
      segv = "ProcessExit|SIGSEGV|Process exited with SIGSEGV",
      error = "ProcessExit|boom|Process exited with boom" }
    for _, o in ipairs(r.results) do
      local kind, n = o.path:match("kind=(%a+)"), o.path:match("n=(%d+)")
      if kind == "ok" then
        assert.are.equal("ok " .. tonumber(n) ^ 2, o.body)
      else
        assert.are.equal(want[kind], o.body)
      end
    end
    -- Five 100 ms timeouts on each of two workers' loops, at once.
    assert(H.now() - t0 < 5, "took " .. (H.now() - t0))
    assert.are.equal("true 42", srv:get_ok("/run"))
    srv:stop_clean()
  end)

  it("works under load with the module loaded before the fork, jobs as the worker's user", function()
    local srv = start(2, { listen = "reuseport" })
    finally(function() srv:stop() end)
    local r = load(srv, { { path = "/uid", count = 200 } }, 20)
    local seen = {}
    for _, o in ipairs(r.results) do
      local ok, uid, pid = o.body:match("^(%S+) (%S+) (%d+)$")
      assert.are.equal("true", ok)
      local worker_uid = nginx.uid_of(tonumber(pid))
      assert.are.equal(tostring(worker_uid), uid)
      if nginx.as_root() then assert.are.equal("65534", uid) end
      seen[pid] = true
    end
    -- Each worker has its own supervisor, started by itself: as its user.
    for _, w in ipairs(srv:workers()) do
      for _, id in ipairs(nginx.handler_procs(nginx.identify(nginx.descendants_of(w)))) do
        assert.are.equal(nginx.uid_of(w), nginx.uid_of(id.pid))
      end
    end
    assert.is_not_nil(next(seen))
    srv:stop_clean()
  end)

  it("raises in phases that cannot yield, and runs pool:async jobs from any phase", function()
    local dir = H.visible_tmpdir()
    os.execute("chmod 1777 " .. H.shell_quote(dir))
    finally(function() H.rm_r(dir) end)
    local srv = start(1, { server = format([[
      location = /phases {
        header_filter_by_lua_block {
          local ok, err = pcall(require("handler").run, function() return 1 end)
          ngx.header["X-Err"] = tostring(err)
        }
        content_by_lua_block { ngx.print("body") }
        log_by_lua_block {
          local handler = require("handler")
          local ok, err = pcall(handler.run, function() return 1 end)
          ngx.log(ngx.ERR, "log phase said: ", tostring(err))
          local dir = %q
          local job = handler.pools.jobs:async(function()
            local f = io.open(dir .. "/from-log-phase", "w")
            f:write("ran")
            f:close()
          end)
          ngx.log(ngx.ERR, "async in the log phase: ", job and "a job" or "nil")
        }
      }
      location = /any {
        content_by_lua_block {
          local handler = require("handler")
          local pool = handler.pools.jobs
          local slow = pool:async(function() local c = os.clock() while os.clock() - c < 2 do end end)
          local fast = pool:async(function() return "fast" end)
          local job, i = handler.wait_any({ slow, fast })
          local none, why = handler.wait_any({ slow }, 50)
          local ok, v = job:await()
          pool:kill_by_ref(slow)
          ngx.print(i, " ", tostring(v), " ", tostring(none), " ", tostring(why))
        }
      }
      location = /threads {
        content_by_lua_block {
          local handler = require("handler")
          local function square(n)
            local ok, v = handler.run(function() return n * n end)
            return v
          end
          local a = ngx.thread.spawn(square, 3)
          local b = ngx.thread.spawn(square, 4)
          local _, x = ngx.thread.wait(a)
          local _, y = ngx.thread.wait(b)
          ngx.print(x + y)
        }
      }
    ]], dir) })
    finally(function() srv:stop() end)
    local status, body, headers = srv:get("/phases", 10000)
    assert.are.equal(200, status)
    assert.are.equal("body", body)
    assert.matches("^handler: cannot wait in the header_filter phase", headers["x-err"])
    assert.is_true(H.wait_until(function() return H.exists(dir .. "/from-log-phase") end, 10),
      "the job started in the log phase never ran\n" .. srv:error_log())
    assert.are.equal("ran", H.read_file(dir .. "/from-log-phase"))
    local log = srv:error_log()
    assert.matches("log phase said: handler: cannot wait in the log phase", log)
    assert.matches("async in the log phase: a job", log)
    assert.are.equal("2 fast nil timeout", srv:get_ok("/any"))
    assert.are.equal("25", srv:get_ok("/threads"))
    srv:stop_clean()
  end)

  it("refuses nginx's values in the caller, naming them, and passes ngx.null", function()
    local srv = start(1, { server = [[
      location = /capture {
        content_by_lua_block {
          local handler = require("handler")
          local what = ngx.var.arg_what
          local ok, err
          if what == "ngx" then
            local ngx = ngx
            ok, err = pcall(handler.run, function() return ngx.var.uri end)
          elseif what == "ctx" then
            local ctx = ngx.ctx
            ctx.user = "x"
            ok, err = pcall(handler.run, function() return ctx.user end)
          elseif what == "sock" then
            local sock = ngx.socket.tcp()
            ok, err = pcall(handler.run, function() return sock end)
          elseif what == "null" then
            local null = ngx.null
            local done, v = handler.run(function() return null, { null } end)
            ngx.print(tostring(done), " ", tostring(v == ngx.null))
            return
          end
          ngx.print(tostring(ok), " ", tostring(err))
        }
      }
    ]] })
    finally(function() srv:stop() end)
    local body = srv:get_ok("/capture?what=ngx")
    assert.matches("^false .*upvalue 'ngx'.*module 'ngx', which exists only in this process", body)
    body = srv:get_ok("/capture?what=ctx")
    assert.matches("^false .*upvalue 'ctx'.*ngx%.ctx, the request's context", body)
    body = srv:get_ok("/capture?what=sock")
    assert.matches("^false .*upvalue 'sock'", body)
    assert.are.equal("true true", srv:get_ok("/capture?what=null"))
    -- The worker goes on serving.
    assert.are.equal("true 42", srv:get_ok("/run"))
    srv:stop_clean()
  end)

  it("delivers a job's events to the waiting request as they come", function()
    local srv = start(1, { server = [[
      location = /events {
        content_by_lua_block {
          local seen = {}
          local ok, v = require("handler").pools.jobs:run(function()
            local job = require("handler.job")
            for i = 1, 3 do job.emit(i) end
            return "done"
          end, { on_event = function(e) seen[#seen + 1] = e end })
          ngx.print(tostring(ok), " ", tostring(v), " ", table.concat(seen, ","))
        }
      }
    ]] })
    finally(function() srv:stop() end)
    assert.are.equal("true done 1,2,3", srv:get_ok("/events"))
    srv:stop_clean()
  end)

  it("runs thousands of back-to-back jobs from one request, and without its bell too", function()
    -- Each job's wait starts the dispatcher anew when the one before has
    -- ended: its connections to the bell must not pile up (once they did,
    -- and a wait then slept for an hour). Then the bell is made
    -- unreachable: the dispatcher looks at the loop every millisecond
    -- instead, and says so in the error log.
    local srv = start(1, { server = [[
      location = /many {
        content_by_lua_block {
          local handler = require("handler")
          local core = require("handler.core")
          local bell = core.bell
          if ngx.var.arg_nobell then
            core.bell = function() return "/nonexistent/handler-bell" end
          end
          local sum = 0
          for i = 1, tonumber(ngx.var.arg_n) do
            local ok, v = handler.run(function(x) return x end, { args = { i } })
            if not ok then error(tostring(v)) end
            sum = sum + v
          end
          core.bell = bell
          ngx.print(sum)
        }
      }
    ]] })
    finally(function() srv:stop() end)
    -- First, with the worker's first dispatcher, the bell out of reach.
    assert.are.equal(tostring(300 * 301 / 2), srv:get_ok("/many?n=300&nobell=1", 30000))
    assert.matches("cannot connect to the loop's bell %(looking at the loop every 1 ms instead%)",
      srv:error_log())
    assert.are.equal(tostring(3000 * 3001 / 2), srv:get_ok("/many?n=3000", 30000))
    srv:stop_clean()
  end)

  it("replaces a killed supervisor for the next request", function()
    local srv = start(1)
    finally(function() srv:stop() end)
    assert.are.equal("true 42", srv:get_ok("/run"))
    srv:wait_supervisors()
    local w = srv:workers()[1]
    local below = nginx.identify(nginx.descendants_of(w))
    local sup
    for _, id in ipairs(below) do
      if id.cmd == "handler: supervisor" then sup = id.pid end
    end
    assert.is_not_nil(sup)
    H.kill9(sup)
    -- Its workers die with it (a job handed to one in the moment between
    -- would be lost, as a job whose worker dies is).
    assert.is_true(nginx.wait_for(function() return #nginx.living(below) == 0 end, 10))
    assert.are.equal("true 42", srv:get_ok("/run"))
    assert.are.equal("true 42", srv:get_ok("/run"))
    srv:stop_clean()
  end)
end)

describe("budgets shared by all nginx workers", function()
  after_each(nginx.stop_all)

  local SHARED_INIT = INIT .. [[
handler.pool{ name = "shared", max_workers = 3, shared_dict = "handler_budgets" }
]]
  local SHARED_LOCATIONS = [[
    location = /timed {
      content_by_lua_block {
        local ok, a, b = require("handler").pools.shared:run(function()
          local ffi = require("ffi")
          pcall(ffi.cdef, "typedef struct { long s, ns; } hd_ts; int clock_gettime(int, hd_ts *);")
          local ts = ffi.new("hd_ts")
          local function now() ffi.C.clock_gettime(1, ts) return tonumber(ts.s) + tonumber(ts.ns) * 1e-9 end
          local t0 = now()
          while now() - t0 < 0.3 do end
          return t0, now()
        end, { pool_timeout = tonumber(ngx.var.arg_wait) or 0, max_ms = 5000 })
        if ok then
          ngx.print(string.format("ok %.6f %.6f %d", a, b, ngx.worker.pid()))
        else
          ngx.print(a.type, " ", ngx.worker.pid())
        end
      }
    }
    location = /hold {
      content_by_lua_block {
        local dir = ngx.var.arg_dir
        local n = tonumber(ngx.var.arg_n) or 1
        for i = 1, n do
          local job, err = require("handler").pools.shared:async(function()
            local c = os.clock()
            while os.clock() - c < 1 do end
            local f = io.open(dir .. "/done-" .. i, "w")
            f:close()
          end, { max_ms = 10000 })
          if not job then ngx.print(err.type, " ") end
        end
        ngx.print(ngx.worker.pid())
      }
    }
    location = /usage {
      content_by_lua_block {
        local d = ngx.shared.handler_budgets
        ngx.print(d:get("handler|shared|w") or 0, " ", d:get("handler|shared|m") or 0)
      }
    }
  ]]

  local function start_shared(n, extra)
    local opts = { workers = n, init = SHARED_INIT, server = SHARED_LOCATIONS,
      shared_dicts = { handler_budgets = "1m" } }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return nginx.start(opts)
  end

  it("holds max_workers across two nginx workers", function()
    local srv = start_shared(2, { listen = "reuseport" })
    finally(function() srv:stop() end)
    local r = load(srv, { { path = "/timed?wait=20000", count = 12 } }, 12)
    local spans, pids = {}, {}
    for _, o in ipairs(r.results) do
      local a, b, pid = o.body:match("^ok (%S+) (%S+) (%d+)$")
      assert(a, "a job failed: " .. o.body)
      spans[#spans + 1] = { tonumber(a), tonumber(b) }
      pids[pid] = true
    end
    -- At no time more than 3 jobs of the pool ran, machine-wide.
    local most = 0
    for _, s in ipairs(spans) do
      local at = 0
      for _, t in ipairs(spans) do
        if t[1] <= s[1] and s[1] < t[2] then at = at + 1 end
      end
      if at > most then most = at end
    end
    assert(most <= 3, "jobs at once: " .. most)
    assert(most >= 2, "the jobs never ran side by side")
    local n = 0
    for _ in pairs(pids) do n = n + 1 end
    assert(n == 2, "served by one nginx worker only; the test proves nothing")
    assert.are.equal("0 0", srv:get_ok("/usage"))
    -- Without waiting, the fourth at once is turned away.
    local burst = load(srv, { { path = "/timed", count = 6 } }, 6)
    local rejected = 0
    for _, o in ipairs(burst.results) do
      if o.body:match("^NoWorkersAvailable") then rejected = rejected + 1 end
    end
    assert(rejected >= 3, "rejected " .. rejected .. " of 6")
    srv:stop_clean()
  end)

  it("takes back the share of an nginx worker killed mid-job", function()
    local dir = H.visible_tmpdir()
    os.execute("chmod 1777 " .. H.shell_quote(dir))
    finally(function() H.rm_r(dir) end)
    local srv = start_shared(1)
    finally(function() srv:stop() end)
    local pid = tonumber(srv:get_ok("/hold?n=3&dir=" .. dir))
    assert.are.equal("3 31457280", srv:get_ok("/usage"))
    local below = nginx.identify(nginx.descendants_of(pid))
    H.kill9(pid)
    -- nginx starts another worker; the dead one's jobs and processes go.
    assert.is_true(H.wait_until(function()
      local w = srv:workers()
      return #w == 1 and w[1] ~= pid
    end, 10))
    assert.is_true(nginx.wait_for(function() return #nginx.living(below) == 0 end, 10),
      "left behind: " .. nginx.describe(nginx.living(below)))
    -- Its share is still counted, until a worker finds the budget full.
    assert.are.equal("3 31457280", srv:get_ok("/usage"))
    local r = load(srv, { { path = "/timed", count = 3 } }, 3)
    for _, o in ipairs(r.results) do assert.matches("^ok ", o.body) end
    assert.are.equal("0 0", srv:get_ok("/usage"))
    srv:stop_clean()
  end)

  it("lets a reloaded worker finish its jobs and give its share back", function()
    local dir = H.visible_tmpdir()
    os.execute("chmod 1777 " .. H.shell_quote(dir))
    finally(function() H.rm_r(dir) end)
    local srv = start_shared(1)
    finally(function() srv:stop() end)
    local old = tonumber(srv:get_ok("/hold?n=2&dir=" .. dir))
    assert.are.equal("2 20971520", srv:get_ok("/usage"))
    local below = nginx.identify(nginx.descendants_of(old))
    srv:reload()
    -- The old worker ran its jobs to their end before it went.
    assert.is_true(H.exists(dir .. "/done-1") and H.exists(dir .. "/done-2"),
      "the old worker's jobs did not finish\n" .. srv:error_log())
    assert.is_true(nginx.wait_for(function() return #nginx.living(below) == 0 end, 10),
      "left behind: " .. nginx.describe(nginx.living(below)))
    assert.are.equal("0 0", srv:get_ok("/usage"))
    assert.matches("^ok ", srv:get_ok("/timed"))
    srv:stop_clean()
  end)
end)
