-- spec/nginx_spec.lua: handler inside a real nginx with the Lua module
-- (spec/support/nginx.lua starts it, spec/support/http.lua talks to it):
-- the module loaded by the master in init_by_lua, jobs run from a request
-- handler, the errors a job can end with, the uid jobs run as, and that a
-- reload or a graceful quit leaves none of handler's processes behind.
-- (Waiting without blocking, shared budgets and phases: nginx_wait_spec.)
-- Skipped, saying why, when nginx or its Lua module is missing.
local nginx = require("spec.support.nginx")
local http = require("spec.support.http")
local H = require("spec.support.helpers")

local format, concat = string.format, table.concat

local available, missing = nginx.available()
if not available then
  describe("handler inside nginx", function()
    pending("skipped: " .. missing)
  end)
  return
end

-- handler loaded by the master, before it forks its workers: they inherit
-- the loaded module. A local, so nginx has no global to warn about.
local INIT = [[local handler = require("handler")]]

local LOCATIONS = nginx.JOB_LOCATIONS .. [[
  location = /plain { return 200 "plain"; }
]]

-- Each worker runs a job as soon as it starts, so that every worker has
-- handler's processes (a supervisor and a worker) when a test looks.
local INIT_WORKER = [[
  local ok, err = ngx.timer.at(0, function()
    local done, e = require("handler").run(function() return true end)
    if not done then
      ngx.log(ngx.ERR, "warm-up job: ", tostring(e.type), " ", tostring(e.reason), " ", tostring(e.message))
    end
  end)
  if not ok then ngx.log(ngx.ERR, "cannot start the warm-up timer: ", err) end
]]

local function start(n, extra)
  local opts = { workers = n, init = INIT, server = LOCATIONS }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return nginx.start(opts)
end

describe("handler inside nginx", function()
  after_each(nginx.stop_all)

  for _, n in ipairs({ 1, 2 }) do
    it(format("starts with %d worker(s), the module loaded by the master, and runs a job", n), function()
      local srv = start(n)
      finally(function() srv:stop() end)
      local workers = srv:workers()
      assert.are.equal(n, #workers)
      -- Loading the module starts nothing: the master's only children are
      -- its workers until a job runs.
      for _, pid in ipairs(nginx.descendants_of(srv.pid)) do
        assert.are.equal("nginx: worker process", nginx.cmdline(pid))
      end
      if nginx.as_root() then
        for _, pid in ipairs(workers) do assert.are.equal(65534, nginx.uid_of(pid)) end
      end
      assert.are.equal("true 42", srv:get_ok("/run"))
      assert.are.equal("true 42", srv:get_ok("/run"))
      -- Nothing went wrong on the way, and no Lua global was written.
      local log = srv:error_log()
      assert.is_nil(log:match("%[error%][^\n]*") or log:match("%[alert%][^\n]*")
        or log:match("%[crit%][^\n]*") or log:match("[^\n]*global Lua variable[^\n]*"))
      srv:stop_clean()
      -- Stopped means gone: the port no longer answers.
      local status, why = http.get(srv.port, "/plain", 2000)
      assert.is_nil(status)
      assert.matches("ECONNREFUSED", why)
    end)
  end

  it("gives a job's errors to the request: Timeout, OOM, ProcessExit by SIGSEGV", function()
    local srv = start(1)
    finally(function() srv:stop() end)
    local started = H.now()
    assert.are.equal("Timeout|nil|Took more than 100ms to complete", srv:get_ok("/cause?kind=timeout"))
    H.assert_ended_by(H.now() - started, 100)
    assert.are.equal("OOM|nil|Process tried to use more than 65536 bytes of memory",
      srv:get_ok("/cause?kind=oom"))
    assert.are.equal("ProcessExit|SIGSEGV|Process exited with SIGSEGV", srv:get_ok("/cause?kind=segv"))
    -- The worker is still serving jobs after all that.
    assert.are.equal("true 42", srv:get_ok("/run"))
    srv:stop_clean()
  end)

  it("runs jobs as the nginx worker's user", function()
    local srv = start(1)
    finally(function() srv:stop() end)
    local ok, uid, pid = srv:get_ok("/uid"):match("^(%S+) (%S+) (%d+)$")
    assert.are.equal("true", ok)
    local worker_uid = nginx.uid_of(tonumber(pid))
    assert.are.equal(tostring(worker_uid), uid)
    if nginx.as_root() then
      -- The master is root, its workers nobody: so are the jobs, not root.
      assert.are.equal(65534, worker_uid)
      assert.are_not.equal("0", uid)
    end
    srv:stop_clean()
  end)

  it("leaves none of the old workers' processes behind after a reload", function()
    local srv = start(2, { init_worker = INIT_WORKER })
    finally(function() srv:stop() end)
    srv:wait_supervisors()
    assert.are.equal("true 42", srv:get_ok("/run"))
    local old = {}
    for _, w in ipairs(srv:workers()) do
      old[#old + 1] = nginx.identify({ w })[1]
      for _, id in ipairs(nginx.identify(nginx.descendants_of(w))) do old[#old + 1] = id end
    end
    assert(#nginx.handler_procs(old) >= 2, "no handler processes under the workers: " .. nginx.describe(old))
    srv:reload()
    local left
    assert(nginx.wait_for(function()
      left = nginx.living(old)
      return #left == 0
    end, 10), "still running 10 s after the reload: " .. nginx.describe(left or {}))
    -- The new workers run jobs.
    srv:wait_supervisors()
    assert.are.equal("true 42", srv:get_ok("/run"))
    srv:stop_clean()
  end)

  it("leaves nothing behind after a graceful quit", function()
    local srv = start(2, { init_worker = INIT_WORKER })
    finally(function() srv:stop() end)
    srv:wait_supervisors()
    assert.are.equal("true 42", srv:get_ok("/run"))
    local before = nginx.identify(srv:descendants())
    local handlers = nginx.handler_procs(before)
    assert(#handlers >= 2, "no handler processes under nginx: " .. nginx.describe(before))
    local master = srv.pid
    srv:quit()
    assert.are.equal("exit 0", srv.exit)
    local left
    assert(nginx.wait_for(function()
      left = nginx.living(before)
      return #left == 0
    end, 10), "still running 10 s after the quit: " .. nginx.describe(left or {}))
    -- By a scan too: no handler process anywhere is one that was nginx's.
    local was = {}
    for _, id in ipairs(handlers) do was[id.pid .. "/" .. id.start] = true end
    for _, id in ipairs(nginx.identify(nginx.pids_with_cmdline("handler:"))) do
      assert(not was[id.pid .. "/" .. id.start], format("%d (%s), below nginx %d, outlived it",
        id.pid, id.cmd, master))
    end
    assert.is_nil(H.proc_state(master))
    srv:stop_clean()
  end)

  it("serves 50 requests at concurrency 10 to the load client", function()
    local srv = start(2)
    finally(function() srv:stop() end)
    local r = http.load({ port = srv.port, requests = { { path = "/plain", count = 50 } },
      concurrency = 10, timeout_ms = 20000 })
    assert(#r.failed == 0, "failed:\n" .. http.describe_failures(r.failed))
    assert.are.equal(50, r.ok)
    assert.are.equal(50, #r.results)
    for _, o in ipairs(r.results) do
      assert.are.equal(200, o.status)
      assert.are.equal("plain", o.body)
      assert.are.equal("/plain", o.path)
    end
    local p50, p99 = http.percentile(r.latencies, 50), http.percentile(r.latencies, 99)
    assert(p50 > 0 and p50 <= p99 and p99 <= r.elapsed_us,
      format("p50 %s µs, p99 %s µs, all %s µs", tostring(p50), tostring(p99), tostring(r.elapsed_us)))
    print(format("\n[nginx] 50 requests, 10 at a time: p50 %.0f µs, p99 %.0f µs, all in %.1f ms",
      p50, p99, r.elapsed_us / 1000))
    srv:stop_clean()
  end)
end)
