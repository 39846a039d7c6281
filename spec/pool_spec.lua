-- pool_spec.lua: pools (docs/API.md, "Pools"): budgets along delegation
-- chains, async/await, kill/kill_by_ref/flush, waiting for capacity, the
-- registry and lifetimes, stats; and the upstream Handler.Pool test suite,
-- case by case, under its own names.
--
-- Jobs that must stay running until the test lets them go wait on a gate: a
-- FIFO the test holds open; a job opens it and blocks in read until the test
-- opens the gate (see `new_gate`). No job here sleeps-and-hopes.
local handler = require("handler")
local H = require("spec.support.helpers")

local format = string.format
local ipairs, pairs, select, tostring, type, pcall = ipairs, pairs, select, tostring, type, pcall
local now, wait_until, alive = H.now, H.wait_until, H.alive
local workers, set_of, new_workers, new_worker = H.workers, H.set_of, H.new_workers, H.new_worker
local write_file, read_file, shell_quote = H.write_file, H.read_file, H.shell_quote

local HOST_PID = H.getpid()

-- Workers that were alive before the current test (another spec's idle
-- ones, say): the checks below are about the others.
local preexisting = {}
local function mine() return new_workers(preexisting) end

local tmpdir
local seq = 0
local function tmpname(what)
  seq = seq + 1
  return format("%s/%s%d", tmpdir, what, seq)
end

---------------------------------------------------------------------------
-- Gates. A gate is a FIFO the test holds open read-write, so a job's open
-- for reading returns at once and its read blocks. Opening the gate first
-- renames a regular file over the FIFO's path (jobs that have not opened it
-- yet find a file and go on), then closes the test's end (jobs blocked in
-- read get EOF). No job can miss it.

local gates = {}

local function new_gate()
  local path = tmpname("gate")
  H.mkfifo(path)
  local g = { path = path, holder = assert(io.open(path, "r+")) }
  gates[#gates + 1] = g
  return g
end

local function open_gate(g)
  if g.holder == nil then return end
  local tmp = g.path .. ".open"
  write_file(tmp, "")
  assert(os.rename(tmp, g.path))
  g.holder:close()
  g.holder = nil
end

-- Job bodies. They run in the worker with small heaps (down to 1 KiB), so
-- they use only io and plain Lua; they capture strings, never the gate.

-- The pid of the worker process the job runs in.
local function worker_pid()
  local f = io.open("/proc/self/stat")
  local pid = f:read("*n")
  f:close()
  return pid
end

-- Returns `ret` once the gate at `path` opens.
local waiter = H.job_bodies().waiter

-- Returns its worker's pid once the gate at `path` opens.
local function pid_waiter(path)
  local wait = waiter(path)
  return function()
    wait()
    return worker_pid()
  end
end

-- Appends `name` to the file at `log` when it starts, then waits on the gate.
local function logging_waiter(log, path, name)
  local wait = waiter(path, name)
  return function()
    local l = io.open(log, "a")
    l:write(name)
    l:close()
    return wait()
  end
end

local function spin() while true do end end

-- Submits to pool p a job that returns `ret` once gate g opens; asserts it
-- was accepted and returns it.
local function hold(p, g, ret, opts)
  return assert(p:async(waiter(g.path, ret), opts))
end

---------------------------------------------------------------------------
-- Every pool a test makes goes through `pool`, so after_each can check it is
-- empty, close it and see its processes end.

local made = {}
local function pool(config)
  local p = handler.pool(config)
  made[#made + 1] = p
  return p
end

-- Opens gate g, then asserts that each { job, value } given returns true
-- and that value.
local function release(g, ...)
  open_gate(g)
  for i = 1, select("#", ...) do
    local pair = select(i, ...)
    assert.are.same({ true, pair[2] }, { pair[1]:await() })
  end
end

-- A pool made by `pool`, and a new gate for its jobs.
local function gated_pool(config)
  return pool(config), new_gate()
end

local function stats_line(p)
  local s = p:stats()
  return format("%s running=%s queued=%s bytes_committed=%s", tostring(p), tostring(s.running),
    tostring(s.queued), tostring(s.bytes_committed))
end

local function assert_empty(p)
  local s = p:stats()
  assert.are.equal(0, s.running, stats_line(p))
  assert.are.equal(0, s.bytes_committed, stats_line(p))
  assert.are.equal(0, s.queued, stats_line(p))
end

-- Asserts that each field of `want` has that value in p:stats().
local function assert_stats(p, want)
  local s = p:stats()
  for k, v in pairs(want) do assert.are.equal(v, s[k], k) end
end

local DEFAULT_KILL = { type = "ProcessExit", message = "User killed the process",
  reason = "user_killed", cause = "killed" }

-- Plain fields of an error value, for comparing with a literal table.
local function fields(err)
  local t = {}
  for k, v in pairs(err) do t[k] = v end
  return t
end

local function assert_killed(ok, err, want)
  assert.is_false(ok)
  assert.are.same(want or DEFAULT_KILL, fields(err))
end

-- The same, with the caller's error `want` first: assert_killed_with(want, job:await()).
local function assert_killed_with(want, ok, err)
  assert_killed(ok, err, want)
end

local function assert_reject(kind, ok, err)
  assert.is_falsy(ok)
  assert.are.equal("table", type(err))
  assert.are.equal(kind, err.type)
  assert.is_true(err.rejected)
  assert.are.equal(err.message, tostring(err))
  if kind == "NoWorkersAvailable" then
    assert.are.equal("No workers available", err.message)
  elseif kind == "InsufficientMemory" then
    assert.are.equal("Not enough memory available", err.message)
  end
end

-- Submits n jobs to p, job i returning ret(i) once gate g opens; each one
-- refused must be a `kind` reject. Returns the accepted ones, in order, as
-- { job =, i = }, and how many were refused.
local function flood(p, g, n, ret, opts, kind)
  local accepted, rejected = {}, 0
  for i = 1, n do
    local job, err = p:async(waiter(g.path, ret(i)), opts)
    if job then
      accepted[#accepted + 1] = { job = job, i = i }
    else
      assert_reject(kind, job, err)
      rejected = rejected + 1
    end
  end
  return accepted, rejected
end

local KiB = 1024

describe("handler pools", function()
  local baseline

  setup(function()
    tmpdir = H.tmpdir()
    -- Start the supervisor (and the loop's fds) before any baseline is taken.
    local before = set_of(workers())
    local warm = handler.pool({ idle_ms = 0 })
    assert(warm:run(function() end))
    warm:close()
    assert(wait_until(function() return #new_workers(before) == 0 end))
  end)

  teardown(function()
    for _, g in ipairs(gates) do open_gate(g) end
    H.rm_r(tmpdir)
  end)

  before_each(function()
    baseline = H.fd_baseline()
    preexisting = set_of(workers())
  end)

  after_each(function()
    -- Let every gated job go; each must then end and leave its pools empty.
    for _, g in ipairs(gates) do open_gate(g) end
    gates = {}
    local pools = made
    made = {}
    for _, p in ipairs(pools) do
      assert(wait_until(function()
        local s = p:stats()
        return s.running == 0 and s.queued == 0
      end), "jobs left behind: " .. stats_line(p))
      assert_empty(p)
    end
    -- No worker beyond the idle processes the root pools keep.
    local kept = 0
    for _, p in ipairs(pools) do kept = kept + p:stats().processes end
    assert(wait_until(function() return #mine() <= kept end),
      format("%d workers alive, the pools keep %d", #mine(), kept))
    -- Each one left is idle, blocked waiting for a job (dying ones drop out of
    -- procs() once their exit is reported).
    H.assert_idle(mine)
    local pids = mine()
    for i = #pools, 1, -1 do pools[i]:close() end
    H.assert_workers_gone(mine, pids)
    -- The host holds no fd the test added: no socket but the supervisor's and
    -- one per live worker, a pidfd per live worker, and the same other fds
    -- as before.
    H.assert_fds_back(baseline)
  end)

  -------------------------------------------------------------------------
  describe("the upstream Handler.Pool suite", function()
    it("a basic pool", function()
      local p = pool({ max_workers = 10, max_memory_bytes = 1024 * KiB })
      local ok, pid = p:run(worker_pid, { max_heap_bytes = 10 * KiB, max_ms = 2000 })
      assert.is_true(ok)
      assert.are.equal("number", type(pid))
      assert.are_not.equal(HOST_PID, pid)
    end)

    it("pools with registered names", function()
      local p = pool({ max_workers = 10, max_memory_bytes = 1024 * KiB, name = "registered_name" })
      assert.are.equal(p, handler.pools.registered_name)
      assert.are.same({ true, 100 },
        { handler.pools.registered_name:run(function() return 10 * 10 end,
          { max_heap_bytes = 3 * KiB }) })
      -- A taken name raises, naming it.
      local ok, err = pcall(function() handler.pool({ name = "registered_name" }) end)
      assert.is_false(ok)
      assert.matches("registered_name", err, 1, true)
      assert.are.equal(p, handler.pools.registered_name)
      -- delegate_to resolves names through the registry.
      local child = pool({ delegate_to = "registered_name" })
      assert.are.same({ true, 7 }, { child:run(function() return 7 end, { max_heap_bytes = 3 * KiB }) })
      assert.are.equal(1, child:stats().started)
      assert.are.equal(2, p:stats().started)
    end)

    it("executing multiple parallel jobs in a pool", function()
      local p, g = gated_pool({ max_workers = 20, max_memory_bytes = 1024 * KiB })
      local jobs = {}
      for i = 1, 20 do
        jobs[i] = assert(p:async(pid_waiter(g.path), { max_heap_bytes = 10 * KiB, max_ms = 20000 }))
      end
      -- All 20 are in flight at once.
      assert.are.equal(20, p:stats().running)
      assert.are.equal(200 * KiB, p:stats().bytes_committed)
      open_gate(g)
      local pids = {}
      for i = 1, 20 do
        local ok, pid = jobs[i]:await()
        assert.is_true(ok)
        assert.are.equal("number", type(pid))
        assert.are_not.equal(HOST_PID, pid)
        pids[pid] = true
      end
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      assert.are.equal(20, n) -- one process each: they ran side by side
      assert_empty(p)
    end)

    it("jobs that run too long return a timeout", function()
      local p = pool({ max_workers = 10, max_memory_bytes = 1024 * KiB })
      local t0 = now()
      local ok, err = p:run(spin, { max_heap_bytes = 10 * KiB, max_ms = 50 })
      local took = now() - t0
      assert.is_false(ok)
      assert.are.equal("Timeout", err.type)
      assert.are.equal("Took more than 50ms to complete", err.message)
      H.assert_ended_by(took, 50)
      assert_empty(p)
      assert.are.equal(1, p:stats().failed_timeout)
    end)

    it("pools that are too busy return NoWorkersAvailable", function()
      local p = pool({ max_workers = 0, max_memory_bytes = 1024 * KiB })
      local ok, err = p:run(function() return "ohai" end, { max_heap_bytes = 10 * KiB, max_ms = 100 })
      assert_reject("NoWorkersAvailable", ok, err)
      assert.are.equal("No workers available", err.message)
      assert_reject("NoWorkersAvailable", p:async(function() return "ohai" end))
      assert.are.equal(0, p:stats().processes_started)
      assert.are.equal(0, #mine())
    end)

    it("NoWorkersAvailable come back in parallel", function()
      -- 2,000 async calls on 5 slots while the first 5 jobs still run.
      local p, g = gated_pool({ max_workers = 5, max_memory_bytes = 1024 * KiB })
      local accepted, rejected = flood(p, g, 2000, function(i) return i end,
        { max_heap_bytes = 10 * KiB, max_ms = 30000 }, "NoWorkersAvailable")
      assert.are.equal(5, #accepted)
      assert.are.equal(1995, rejected)
      for k, a in ipairs(accepted) do assert.are.equal(k, a.i) end -- the first five
      assert.are.equal(5, p:stats().running)
      open_gate(g)
      for _, a in ipairs(accepted) do
        assert.are.same({ true, a.i }, { a.job:await() })
      end
      assert_stats(p, { processes_started = 5, started = 5, succeeded = 5,
        rejected_no_workers = 1995, rejected = 1995 })
    end)

    it("InsufficientMemory is returned if a job is requesting too much memory", function()
      local p = pool({ max_workers = 5, max_memory_bytes = 10 * KiB })
      assert_reject("InsufficientMemory",
        p:run(function() return true end, { max_heap_bytes = 11 * KiB, max_ms = 20 }))
      assert_reject("InsufficientMemory",
        p:async(function() return true end, { max_heap_bytes = 11 * KiB, max_ms = 20 }))
      assert.are.equal(0, p:stats().processes_started)
      assert.are.equal(2, p:stats().rejected_insufficient_memory)
      -- Exactly the budget fits.
      assert.are.same({ true, true },
        { p:run(function() return true end, { max_heap_bytes = 10 * KiB }) })
    end)

    it("InsufficientMemory is returned if a job is requesting too much in combination with other jobs",
      function()
        local p, g = gated_pool({ max_workers = 20, max_memory_bytes = 20 * KiB })
        local accepted, rejected = flood(p, g, 200, function() return true end,
          { max_heap_bytes = 5 * KiB, max_ms = 30000 }, "InsufficientMemory")
        assert.are.equal(4, #accepted)
        assert.are.equal(196, rejected)
        assert.are.equal(20 * KiB, p:stats().bytes_committed)
        open_gate(g)
        for _, a in ipairs(accepted) do assert.are.same({ true, true }, { a.job:await() }) end
        assert.are.equal(4, p:stats().processes_started)
      end)

    it("kills a job by its given task_name", function()
      local task_name = "task_1234"
      local p, g = gated_pool({ max_workers = 5, max_memory_bytes = 1024 * KiB })
      local before = set_of(workers())
      local job = assert(p:async(waiter(g.path, "done"),
        { max_heap_bytes = 10 * KiB, max_ms = 30000, task_name = task_name }))
      local pid = new_worker(before)
      assert(pid, "no new worker")
      assert.is_true(alive(pid))
      assert.are.equal(1, p:kill(task_name))
      -- Released the moment it ends, before anyone awaits.
      assert_empty(p)
      assert_killed(job:await())
      assert(wait_until(function() return not alive(pid) end), "the killed worker lives on")
      assert.are.equal(0, p:kill(task_name))
      assert.are.equal(1, p:stats().killed)
    end)

    describe("composed pools", function()
      -- The root, the composed pool, and a gate for their jobs.
      local function setup_composed_pools()
        local root = pool({ max_workers = 2, max_memory_bytes = 20 * KiB })
        local customer1 = pool({ max_workers = 1, max_memory_bytes = 10 * KiB, delegate_to = root })
        return root, customer1, new_gate()
      end

      it("jobs successfully delegate to the root pool", function()
        local root, composed = setup_composed_pools()
        assert.are.same({ true, 100 },
          { composed:run(function() return 10 * 10 end, { max_heap_bytes = 5 * KiB, max_ms = 2000 }) })
        assert.are.equal(1, composed:stats().started)
        assert.are.equal(1, root:stats().started)
        -- Worker processes belong to the root pool.
        assert.are.equal(1, root:stats().processes_started)
        assert.are.equal(0, composed:stats().processes_started)
      end)

      it("resources are marked free from both pools", function()
        local root, composed = setup_composed_pools()
        for _ = 1, 100 do
          assert.are.same({ true, 100 },
            { composed:run(function() return 10 * 10 end, { max_heap_bytes = 5 * KiB, max_ms = 2000 }) })
          assert_empty(composed)
          assert_empty(root)
        end
        assert.are.equal(100, root:stats().succeeded)
        assert.are.equal(100, composed:stats().succeeded)
        assert.are.equal(1, root:stats().processes_started) -- one process, reused
      end)

      it("memory limits of composed pool are enforced", function()
        local root, composed = setup_composed_pools()
        assert_reject("InsufficientMemory",
          composed:run(function() return true end, { max_ms = 30, max_heap_bytes = 11 * KiB }))
        assert.are.equal(0, root:stats().processes_started)
      end)

      it("worker limits of composed pool are enforced", function()
        local root, composed, g = setup_composed_pools()
        local opts = { max_ms = 30000, max_heap_bytes = 3 * KiB }
        local job = hold(composed, g, 1, opts)
        assert_reject("NoWorkersAvailable", composed:run(function() return 10 * 10 end, opts))
        -- The root has room, but the child's one slot is taken.
        assert.are.equal(1, root:stats().running)
        release(g, { job, 1 })
      end)

      it("memory limits of root pool are enforced", function()
        local root, composed, g = setup_composed_pools()
        local job = hold(root, g, 1, { max_ms = 30000, max_heap_bytes = 12 * KiB })
        assert_reject("InsufficientMemory",
          composed:run(function() return true end, { max_ms = 2000, max_heap_bytes = 9 * KiB }))
        release(g, { job, 1 })
        -- With the root free again, the same job fits.
        assert.are.same({ true, true },
          { composed:run(function() return true end, { max_ms = 2000, max_heap_bytes = 9 * KiB }) })
      end)

      it("worker limits of root pool are enforced", function()
        local root, composed, g = setup_composed_pools()
        local opts = { max_ms = 30000, max_heap_bytes = 5 * KiB }
        local a = hold(root, g, 1, opts)
        local b = hold(root, g, 2, opts)
        assert_reject("NoWorkersAvailable",
          composed:run(function() return 10 * 10 end, { max_ms = 30, max_heap_bytes = 3 * KiB }))
        assert.are.equal(0, composed:stats().running)
        release(g, { a, 1 }, { b, 2 })
      end)

      it("killing workers in a composed pools", function()
        local task_name = "task_1234"
        local root, composed, g = setup_composed_pools()
        local opts = { max_ms = 30000, max_heap_bytes = 2 * KiB, task_name = task_name }

        -- From the child, then from the root.
        for i, from in ipairs({ composed, root }) do
          local before = set_of(workers())
          local job = hold(composed, g, i, opts)
          local pid = new_worker(before)
          assert(pid, "no new worker")
          assert.are.equal(1, root:stats().running)
          assert.are.equal(1, from:kill(task_name))
          assert_killed(job:await())
          assert(wait_until(function() return not alive(pid) end))
          assert.are.equal(0, from:kill(task_name))
          assert_empty(composed)
          assert_empty(root)
        end
      end)
    end)

    describe("dynamic composed pools", function()
      -- Even params go to the even root, odd ones to the odd root, "all" to
      -- both in turn. Returns the roots, the child, the params delegate_fun
      -- saw, and a gate for their jobs.
      local function setup_dynamic_composed_pools()
        local even_root = pool({ max_workers = 2, max_memory_bytes = 20 * KiB })
        local odd_root = pool({ max_workers = 2, max_memory_bytes = 20 * KiB })
        local seen = {}
        local child = pool({
          max_workers = 4,
          max_memory_bytes = 40 * KiB,
          delegate_fun = function(param)
            seen[#seen + 1] = param
            if param == "all" then return { even_root, odd_root } end
            if param % 2 == 0 then return { even_root } end
            return { odd_root }
          end,
        })
        return even_root, odd_root, child, seen, new_gate()
      end

      it("jobs execute in one of the root pools", function()
        local even_root, odd_root, child, seen = setup_dynamic_composed_pools()
        assert.are.same({ true, "ok" }, { child:run(function() return "ok" end,
          { max_heap_bytes = 10 * KiB, delegate_param = 2 }) })
        assert.are.same({ true, "ok" }, { child:run(function() return "ok" end,
          { max_heap_bytes = 10 * KiB, delegate_param = 1 }) })
        assert.are.same({ 2, 1 }, seen)
        assert.are.equal(1, even_root:stats().succeeded)
        assert.are.equal(1, odd_root:stats().succeeded)
        assert.are.equal(2, child:stats().succeeded)
      end)

      it("jobs run in their corresponding root pools", function()
        local even_root, odd_root, child, _, g = setup_dynamic_composed_pools()
        local even = hold(child, g, "even", { max_heap_bytes = 10 * KiB, delegate_param = 4, max_ms = 30000 })
        local odd = hold(child, g, "odd", { max_heap_bytes = 10 * KiB, delegate_param = 5, max_ms = 30000 })
        -- The child holds both jobs, each root only its own.
        assert.are.equal(2, child:stats().running)
        assert.are.equal(1, even_root:stats().running)
        assert.are.equal(1, odd_root:stats().running)
        -- Killing by ref from each root reaches only the job delegated to it.
        assert.are.same({ false, "no_such_worker" }, { even_root:kill_by_ref(odd) })
        assert.are.same({ false, "no_such_worker" }, { odd_root:kill_by_ref(even) })
        assert.is_true(even_root:kill_by_ref(even))
        assert_killed(even:await())
        assert.are.equal(1, child:stats().running)
        assert.are.equal(0, even_root:stats().running)
        release(g, { odd, "odd" })
        assert.are.equal(1, even_root:stats().processes_started)
        assert.are.equal(1, odd_root:stats().processes_started)
      end)

      it("jobs will attempt all available pools until they find a match", function()
        local even_root, odd_root, child, _, g = setup_dynamic_composed_pools()
        local opts = { max_heap_bytes = 10 * KiB, delegate_param = "all", max_ms = 30000 }
        -- Two roots with 20 KiB each: four jobs fit, the fifth finds none.
        local jobs = {}
        jobs[1] = hold(child, g, 1, opts)
        -- Candidates are tried in the order delegate_fun gives them.
        assert.are.equal(1, even_root:stats().running)
        assert.are.equal(0, odd_root:stats().running)
        for i = 2, 4 do jobs[i] = hold(child, g, i, opts) end
        assert.are.equal(2, even_root:stats().running)
        assert.are.equal(2, odd_root:stats().running)
        local job, err = child:async(waiter(g.path, 5), opts)
        assert.is_nil(job)
        assert.are.same({ type = "NoWorkersAvailable", message = "No workers available",
          rejected = true }, fields(err))
        open_gate(g)
        for i = 1, 4 do assert.are.same({ true, i }, { jobs[i]:await() }) end
      end)

      it("a job no candidate accepts is rejected with NoWorkersAvailable, even for memory", function()
        local a = pool({ max_workers = 10, max_memory_bytes = 4 * KiB })
        local b = pool({ max_workers = 10, max_memory_bytes = 4 * KiB })
        local child = pool({ delegate_fun = function() return { a, b } end })
        assert_reject("NoWorkersAvailable", child:run(function() end, { max_heap_bytes = 8 * KiB }))
        local none = pool({ delegate_fun = function() return {} end })
        assert_reject("NoWorkersAvailable", none:run(function() end))
        assert_reject("NoWorkersAvailable", none:async(function() end))
        assert.are.equal(0, a:stats().processes_started + b:stats().processes_started)
      end)

      it("delegate_fun chains compose with delegate_to up to a shared root", function()
        local root = pool({ max_workers = 3 })
        local left = pool({ delegate_to = root, max_workers = 1 })
        local right = pool({ delegate_to = root, max_workers = 1 })
        local child, g = gated_pool({ delegate_fun = function() return { left, right } end })
        local a = hold(child, g, "a", { max_ms = 30000 })
        local b = hold(child, g, "b", { max_ms = 30000 })
        assert.are.equal(1, left:stats().running)
        assert.are.equal(1, right:stats().running)
        assert.are.equal(2, root:stats().running)
        -- Both middle pools are full.
        assert_reject("NoWorkersAvailable", child:async(waiter(g.path, "c")))
        -- Killing from the shared root reaches jobs delegated through either.
        assert.are.equal(2, root:flush())
        assert_killed(a:await())
        assert_killed(b:await())
        for _, p in ipairs({ root, left, right, child }) do assert_empty(p) end
      end)
    end)

    describe("validating opts", function()
      local function raises(pattern, f)
        local ok, err = pcall(f)
        assert.is_false(ok, "expected an error matching " .. pattern)
        assert.are.equal("string", type(err))
        assert.matches(pattern, err)
        -- Raised at the caller's level.
        assert.matches("pool_spec%.lua:%d+:", err)
      end

      it("opts must be passed as a table", function()
        local p = pool({})
        raises("table", function() p:run(function() return true end, false) end)
        raises("table", function() p:async(function() return true end, "max_ms=1") end)
        assert.are.equal(0, p:stats().started)
      end)

      it("an unexpected option raises an error", function()
        local p = pool({})
        raises("max_time", function() p:run(function() return true end, { max_time = 100 }) end)
        raises("max_time", function() p:async(function() return true end, { max_time = 100 }) end)
        assert.are.equal(0, p:stats().started)
      end)

      it("an option with an invalid value raises an error", function()
        local p = pool({})
        raises("max_heap_bytes", function()
          p:run(function() return true end, { max_heap_bytes = "However much I want" })
        end)
        assert.are.equal(0, p:stats().started)
      end)

      it("a non-option entry in the opts raises an error", function()
        local p = pool({})
        raises("'1'", function() p:run(function() return true end, { "max_ms" }) end)
        assert.are.equal(0, p:stats().started)
      end)

      it("every bad job option raises, naming the option", function()
        local p = pool({})
        local bad = {
          { "max_ms", -1 }, { "max_ms", "10" }, { "max_ms", 0 / 0 },
          { "max_heap_bytes", 0 }, { "max_heap_bytes", -5 }, { "max_heap_bytes", {} },
          { "task_name", 12 }, { "task_name", true },
          { "pool_timeout", -1 }, { "pool_timeout", "soon" },
        }
        for _, case in ipairs(bad) do
          local k, v = case[1], case[2]
          raises(k, function() p:run(function() end, { [k] = v }) end)
          raises(k, function() p:async(function() end, { [k] = v }) end)
        end
        raises("function", function() p:run(42) end)
        raises("function", function() p:async(nil) end)
        assert.are.equal(0, p:stats().started)
        assert.are.equal(0, p:stats().processes_started)
        -- delegate_param takes any value.
        assert.are.same({ true, 1 }, { p:run(function() return 1 end, { delegate_param = {} }) })
      end)

      it("every bad pool config raises, naming the key or value", function()
        raises("bogus", function() handler.pool({ bogus = 1 }) end)
        raises("table", function() handler.pool("shared") end)
        local bad = {
          { "max_workers", -1 }, { "max_workers", 1.5 }, { "max_workers", "5" },
          { "max_memory_bytes", -1 }, { "max_memory_bytes", "10GB" }, { "max_memory_bytes", 0 / 0 },
          { "name", 7 }, { "name", "" },
          { "delegate_to", 5 }, { "delegate_to", {} },
          { "delegate_fun", "even_odd" }, { "delegate_fun", {} },
          { "idle_ms", -1 },
        }
        for _, case in ipairs(bad) do
          local k, v = case[1], case[2]
          raises(k, function() handler.pool({ [k] = v }) end)
        end
        raises("no_such_pool", function() handler.pool({ delegate_to = "no_such_pool" }) end)
        local root = pool({})
        raises("delegate", function()
          handler.pool({ delegate_to = root, delegate_fun = function() return { root } end })
        end)
        -- A failed config registers nothing.
        raises("max_workers", function() handler.pool({ name = "half_made", max_workers = -1 }) end)
        assert.is_nil(handler.pools.half_made)
      end)

      it("bad arguments to kill, kill_by_ref and flush raise", function()
        local p = pool({})
        raises("string", function() p:kill(nil) end)
        raises("string", function() p:kill(5) end)
        raises("table", function() p:kill("x", "oops") end)
        raises("job", function() p:kill_by_ref("job") end)
        raises("job", function() p:kill_by_ref(p) end)
        raises("table", function() p:flush(42) end)
        raises("job", function() handler.await({}) end)
      end)

      it("a delegate_fun that returns something other than pools raises", function()
        local p = pool({ delegate_fun = function() return "elsewhere" end })
        raises("delegate_fun", function() p:run(function() end) end)
        local q = pool({ delegate_fun = function() return { 42 } end })
        raises("delegate_fun", function() q:run(function() end) end)
      end)
    end)
  end)

  -------------------------------------------------------------------------
  describe("docs/API.md", function()
    it("the example: a customer pool delegating to a shared pool by name", function()
      local shared = pool({ name = "shared_pool", max_memory_bytes = 10 * 2 ^ 30 })
      local customer = pool({
        name = "customer_pool", delegate_to = "shared_pool", max_memory_bytes = 5 * 2 ^ 30 })
      assert.are.same({ true, 100 },
        { customer:run(function() return 10 * 10 end, { max_heap_bytes = 100 * 1024 }) })
      assert.are.equal(customer, handler.pools.customer_pool)
      assert.are.equal(shared, handler.pools.shared_pool)
      assert.are.equal(1, shared:stats().succeeded)
    end)
  end)

  -------------------------------------------------------------------------
  describe("async and await", function()
    it("pool:async returns a job; job:await() and handler.await(job) give its result", function()
      local p, g = gated_pool({})
      local a = hold(p, g, "a")
      local b = assert(p:async(function() return "b", nil, 3 end))
      assert.is_false(a:done())
      release(g, { a, "a" })
      assert.is_true(a:done())
      local r = { handler.await(b) }
      assert.are.equal(4, select("#", handler.await(b)))
      assert.are.same({ true, "b", nil, 3 }, r)
      -- pool:run returns like handler.run, with all results.
      assert.are.equal(4, select("#", p:run(function() return "a", nil, 3 end)))
    end)

    it("many jobs in flight from one caller, awaited in any order", function()
      local p = pool({ max_workers = 8 })
      local jobs = {}
      for i = 1, 200 do
        jobs[#jobs + 1] = { job = assert(p:async(function() return i * 2 end)), i = i }
        if #jobs == 8 then
          for k = #jobs, 1, -1 do
            assert.are.same({ true, jobs[k].i * 2 }, { jobs[k].job:await() })
          end
          jobs = {}
        end
      end
      for k = #jobs, 1, -1 do assert.are.same({ true, jobs[k].i * 2 }, { jobs[k].job:await() }) end
      assert.are.equal(200, p:stats().succeeded)
      assert.is_true(p:stats().processes_started <= 8)
    end)
  end)

  -------------------------------------------------------------------------
  describe("kill, kill_by_ref and flush", function()
    it("kill with a caller's error table gives that error to the awaiting caller", function()
      local p, g = gated_pool({})
      local job = hold(p, g, 1, { task_name = "t" })
      local mine = { type = "Cancelled", message = "the customer left", code = 499 }
      assert.are.equal(1, p:kill("t", mine))
      assert_killed_with(mine, job:await())
      assert_empty(p)
    end)

    it("kill counts and kills only the jobs with that task_name", function()
      local p, g = gated_pool({})
      local a1 = hold(p, g, "a1", { task_name = "a" })
      local a2 = hold(p, g, "a2", { task_name = "a" })
      local b = hold(p, g, "b", { task_name = "b" })
      local anon = hold(p, g, "anon")
      assert.are.equal(0, p:kill("nobody"))
      assert.are.equal(2, p:kill("a"))
      assert_killed(a1:await())
      assert_killed(a2:await())
      assert.are.equal(2, p:stats().running)
      release(g, { b, "b" }, { anon, "anon" })
    end)

    it("kill_by_ref returns true and the awaiting caller gets the default error", function()
      local p, g = gated_pool({})
      local before = set_of(workers())
      local job = hold(p, g, 1)
      local pid = new_worker(before)
      assert(pid, "no new worker")
      local r = { p:kill_by_ref(job) }
      assert.are.same({ true }, r)
      assert_empty(p)
      assert_killed(job:await())
      assert(wait_until(function() return not alive(pid) end))
    end)

    it("kill_by_ref with a caller's error table", function()
      local p, g = gated_pool({})
      local job = hold(p, g, 1)
      local mine = { type = "Mine", message = "mine" }
      assert.is_true(p:kill_by_ref(job, mine))
      assert_killed_with(mine, handler.await(job))
    end)

    it("kill_by_ref of a finished job returns false, 'no_such_worker'", function()
      local p = pool({})
      local job = assert(p:async(function() return 1 end))
      assert.are.same({ true, 1 }, { job:await() })
      assert.are.same({ false, "no_such_worker" }, { p:kill_by_ref(job) })
      -- A killed job is finished too.
      local g = new_gate()
      local k = hold(p, g, 1)
      assert.is_true(p:kill_by_ref(k))
      assert.are.same({ false, "no_such_worker" }, { p:kill_by_ref(k) })
      assert_killed(k:await())
      -- The result is still the job's own.
      assert.are.same({ true, 1 }, { job:await() })
    end)

    it("kill_by_ref of a job of another pool returns false, 'no_such_worker'", function()
      local p = pool({})
      local other, g = gated_pool({})
      local job = hold(p, g, "mine")
      assert.are.same({ false, "no_such_worker" }, { other:kill_by_ref(job) })
      assert.are.equal(1, p:stats().running)
      release(g, { job, "mine" })
    end)

    it("flush kills every job of the pool and returns the count", function()
      local p, g = gated_pool({})
      local jobs = {}
      for i = 1, 3 do jobs[i] = hold(p, g, i) end
      assert.are.equal(3, p:flush())
      assert_empty(p)
      for i = 1, 3 do assert_killed(jobs[i]:await()) end
      assert.are.equal(0, p:flush())
      -- With a caller's error.
      local mine = { type = "Shutdown", message = "going down" }
      for i = 1, 2 do jobs[i] = hold(p, g, i) end
      assert.are.equal(2, p:flush(mine))
      for i = 1, 2 do
        assert_killed_with(mine, jobs[i]:await())
      end
      assert.are.equal(5, p:stats().killed)
    end)

    it("flush in a child kills only the child's jobs; flush in the root kills the delegated ones too",
      function()
        local root = pool({})
        local c1 = pool({ delegate_to = root })
        local c2, g = gated_pool({ delegate_to = root })
        local j1 = hold(c1, g, 1)
        local j2 = hold(c2, g, 2)
        local j3 = hold(root, g, 3)
        assert.are.equal(1, c1:flush())
        assert_killed(j1:await())
        assert.are.same({ false, "no_such_worker" }, { c1:kill_by_ref(j2) }) -- a sibling's
        assert.are.equal(2, root:flush())
        assert_killed(j2:await())
        assert_killed(j3:await())
        for _, p in ipairs({ root, c1, c2 }) do assert_empty(p) end
      end)

    it("kill from a sibling pool reaches nothing", function()
      local root = pool({})
      local c1 = pool({ delegate_to = root })
      local c2, g = gated_pool({ delegate_to = root })
      local job = hold(c1, g, "ok", { task_name = "t" })
      assert.are.equal(0, c2:kill("t"))
      assert.are.equal(0, c2:flush())
      release(g, { job, "ok" })
    end)

    it("kill_by_ref reaches a job from any pool of its chain", function()
      local root = pool({})
      local mid = pool({ delegate_to = root })
      local leaf, g = gated_pool({ delegate_to = mid })
      for _, from in ipairs({ leaf, mid, root }) do
        local job = hold(leaf, g, 1)
        assert.is_true(from:kill_by_ref(job))
        assert_killed(job:await())
        for _, p in ipairs({ root, mid, leaf }) do assert_empty(p) end
      end
    end)
  end)

  -------------------------------------------------------------------------
  describe("budgets", function()
    it("a job reserves one slot and max_heap_bytes in its pool and every pool it is delegated to",
      function()
        local root = pool({ max_workers = 10, max_memory_bytes = 1024 * KiB })
        local mid = pool({ delegate_to = root, max_workers = 5, max_memory_bytes = 512 * KiB })
        local leaf, g = gated_pool({ delegate_to = mid, max_workers = 2 })
        local a = hold(leaf, g, 1, { max_heap_bytes = 100 * KiB })
        local b = hold(mid, g, 2, { max_heap_bytes = 30 * KiB })
        assert.are.equal(1, leaf:stats().running)
        assert.are.equal(100 * KiB, leaf:stats().bytes_committed)
        assert.are.equal(2, mid:stats().running)
        assert.are.equal(130 * KiB, mid:stats().bytes_committed)
        assert.are.equal(2, root:stats().running)
        assert.are.equal(130 * KiB, root:stats().bytes_committed)
        -- The limits of every pool in the chain hold at once.
        assert_reject("InsufficientMemory",
          leaf:async(waiter(g.path, 3), { max_heap_bytes = 400 * KiB })) -- mid: 130 + 400 > 512
        release(g, { a, 1 }, { b, 2 })
      end)

    it("NoWorkersAvailable is checked before InsufficientMemory", function()
      local p, g = gated_pool({ max_workers = 1, max_memory_bytes = 10 * KiB })
      local job = hold(p, g, 1, { max_heap_bytes = 5 * KiB })
      assert_reject("NoWorkersAvailable", p:run(function() end, { max_heap_bytes = 20 * KiB }))
      release(g, { job, 1 })
      -- Along a chain, as upstream, each pool is asked in turn from the job's
      -- own pool up, each checking slots before memory: a child out of
      -- memory answers before a root out of slots, and the other way round.
      local root = pool({ max_workers = 1, max_memory_bytes = 16 * KiB })
      local child, g2 = gated_pool({ delegate_to = root, max_workers = 1, max_memory_bytes = 4 * KiB })
      local busy = hold(root, g2, 2, { max_heap_bytes = 1 * KiB })
      assert_reject("InsufficientMemory", child:run(function() end, { max_heap_bytes = 8 * KiB }))
      release(g2, { busy, 2 })
      local g3 = new_gate()
      busy = hold(child, g3, 3, { max_heap_bytes = 1 * KiB })
      assert_reject("NoWorkersAvailable", child:run(function() end, { max_heap_bytes = 32 * KiB }))
      release(g3, { busy, 3 })
    end)

    it("are back to zero after every outcome in every pool of the chain", function()
      local root = pool({ max_workers = 10, max_memory_bytes = 4096 * KiB })
      local mid = pool({ delegate_to = root, max_memory_bytes = 2048 * KiB })
      local leaf = pool({ delegate_to = mid, name = "budget_leaf" })
      local chain = { leaf, mid, root }
      local HEAP = 256 * KiB
      local g = new_gate()
      local function check_reserved(what)
        for _, p in ipairs(chain) do
          assert.are.equal(1, p:stats().running, what .. ": " .. stats_line(p))
          assert.are.equal(HEAP, p:stats().bytes_committed, what .. ": " .. stats_line(p))
        end
      end
      local function check_free(what)
        for _, p in ipairs(chain) do
          assert.are.equal(0, p:stats().running, what .. ": " .. stats_line(p))
          assert.are.equal(0, p:stats().bytes_committed, what .. ": " .. stats_line(p))
        end
      end
      local cases = {
        { "result", waiter(g.path, "r"), {}, function(job)
          open_gate(g)
          return job:await()
        end, function(ok, v) return ok and v == "r" end },
        { "raised error", function() error("boom") end, {}, nil,
          function(ok, e) return not ok and e.type == "ProcessExit" and e.reason:match("boom$") end },
        { "timeout", spin, { max_ms = 30 }, nil,
          function(ok, e) return not ok and e.type == "Timeout" end },
        { "OOM", function() local t = {} for i = 1, 1e7 do t[i] = i end return #t end, {}, nil,
          function(ok, e) return not ok and e.type == "OOM" end },
        { "os.exit", function() os.exit(3) end, {}, nil,
          function(ok, e) return not ok and e.type == "ProcessExit" and e.reason == "exit 3" end },
        { "crash", function() require("ffi").cast("int *", 0)[0] = 1 end, {}, nil,
          function(ok, e) return not ok and e.type == "ProcessExit" and e.reason == "SIGSEGV" end },
        { "result that cannot travel", function() return coroutine.create(print) end, {}, nil,
          function(ok, e) return not ok and e.type == "ProcessExit" end },
        { "kill from the leaf", spin, { task_name = "k" }, function(job)
          assert.are.equal(1, leaf:kill("k"))
          check_free("right after the kill")
          return job:await()
        end, function(ok, e) return not ok and e.reason == "user_killed" end },
        { "kill from the root", spin, { task_name = "k" }, function(job)
          assert.are.equal(1, root:kill("k"))
          check_free("right after the kill")
          return job:await()
        end, function(ok, e) return not ok and e.reason == "user_killed" end },
        { "kill_by_ref from the middle", spin, {}, function(job)
          assert.is_true(mid:kill_by_ref(job))
          check_free("right after kill_by_ref")
          return job:await()
        end, function(ok, e) return not ok and e.reason == "user_killed" end },
        { "flush of the leaf", spin, {}, function(job)
          assert.are.equal(1, leaf:flush())
          check_free("right after flush")
          return job:await()
        end, function(ok, e) return not ok and e.reason == "user_killed" end },
        { "flush of the root", spin, {}, function(job)
          assert.are.equal(1, root:flush())
          return job:await()
        end, function(ok, e) return not ok and e.reason == "user_killed" end },
        { "close of the leaf", spin, {}, function(job)
          leaf:close()
          check_free("right after close")
          return job:await()
        end, function(ok, e) return not ok and e.reason == "user_killed" end },
      }
      for _, case in ipairs(cases) do
        local name, fn, opts, finish, expect = case[1], case[2], case[3], case[4], case[5]
        opts.max_heap_bytes = HEAP
        opts.max_ms = opts.max_ms or 30000
        local job = assert(leaf:async(fn, opts), name)
        check_reserved(name)
        local r = { (finish or handler.await)(job) }
        assert.is_true(expect(r[1], r[2]) and true or false,
          name .. ": unexpected outcome " .. tostring(r[1]) .. " " .. tostring(r[2]))
        check_free(name)
      end
      assert.is_nil(handler.pools.budget_leaf)
      -- A job queued and then timed out, and one rejected, reserve nothing either.
      local g2 = new_gate()
      local hog = hold(root, g2, 1, { max_heap_bytes = 4096 * KiB })
      assert_reject("PoolTimeout", mid:run(function() end, { max_heap_bytes = HEAP, pool_timeout = 20 }))
      assert_reject("InsufficientMemory", mid:run(function() end, { max_heap_bytes = HEAP }))
      assert.are.equal(0, mid:stats().running)
      assert.are.equal(0, mid:stats().bytes_committed)
      release(g2, { hog, 1 })
      check_free("at the end")
    end)

    it("a rejected job never starts a process", function()
      local root = pool({ max_workers = 1, max_memory_bytes = 8 * KiB })
      local child, g = gated_pool({ delegate_to = root })
      local job = hold(root, g, 1, { max_heap_bytes = 1 * KiB })
      assert(wait_until(function() return #mine() == 1 end))
      local pids = mine()
      local started = root:stats().processes_started
      assert_reject("NoWorkersAvailable", child:run(spin))
      assert_reject("NoWorkersAvailable", child:async(spin))
      assert_reject("PoolTimeout", root:run(spin, { max_heap_bytes = 1 * KiB, pool_timeout = 10 }))
      local empty = pool({ max_memory_bytes = 1 * KiB })
      assert_reject("InsufficientMemory", empty:run(spin, { max_heap_bytes = 2 * KiB }))
      local dyn = pool({ delegate_fun = function() return { root } end })
      assert_reject("NoWorkersAvailable", dyn:run(spin))
      assert.are.equal(started, root:stats().processes_started)
      assert.are.equal(0, empty:stats().processes_started)
      assert.are.same(pids, mine())
      assert.are.equal(1, root:stats().started)
      assert.are.equal(0, child:stats().started)
      release(g, { job, 1 })
    end)
  end)

  -------------------------------------------------------------------------
  describe("pool_timeout", function()
    -- A runs, holding gate 1; B and then C queue behind it, both on gate 2.
    -- When A ends, B starts and C still waits (`heaps`: max_heap_bytes of A,
    -- B and C, when the pool has a memory budget); C starts only with B.
    local first_come = {
      { "a job waits first-come-first-served for capacity and starts when a slot frees",
        config = { max_workers = 1 }, heaps = {}, while_queued = function(p, b)
          assert.is_false(b:done())
          assert.are.equal(1, p:stats().processes_started) -- queued jobs hold no process
        end },
      -- B waits for memory; C would fit now, but B came first. B and C do
      -- not fit together either, so C starts only once B has ended.
      { "a job that arrives later does not overtake one already waiting",
        config = { max_workers = 10, max_memory_bytes = 10 * KiB },
        heaps = { 6 * KiB, 8 * KiB, 4 * KiB } },
    }
    for _, case in ipairs(first_come) do
      it(case[1], function()
        local p = pool(case.config)
        local g1, g2 = new_gate(), new_gate()
        local log = tmpname("log")
        write_file(log, "")
        local h = case.heaps
        local a = assert(p:async(logging_waiter(log, g1.path, "A"), h[1] and { max_heap_bytes = h[1] }))
        local b = assert(p:async(logging_waiter(log, g2.path, "B"),
          { max_heap_bytes = h[2], pool_timeout = 20000 }))
        local c = assert(p:async(logging_waiter(log, g2.path, "C"),
          { max_heap_bytes = h[3], pool_timeout = 20000 }))
        assert.are.equal(2, p:stats().queued)
        assert.are.equal(1, p:stats().running)
        if case.while_queued then case.while_queued(p, b) end
        release(g1, { a, "A" })
        assert(wait_until(function() return read_file(log) == "AB" end), "log: " .. read_file(log))
        assert.are.equal(1, p:stats().queued)
        release(g2, { b, "B" }, { c, "C" })
        assert.are.equal("ABC", read_file(log))
      end)
    end

    it("a job waits for capacity in every pool of its chain", function()
      local root = pool({ max_workers = 1 })
      local child, g = gated_pool({ delegate_to = root, max_workers = 5 })
      local a = hold(root, g, "a")
      local b = assert(child:async(function() return "b" end, { pool_timeout = 20000 }))
      assert.are.equal(1, child:stats().queued)
      assert.are.equal(0, child:stats().running)
      release(g, { a, "a" }, { b, "b" })
    end)

    it("PoolTimeout when the wait ends", function()
      local p, g = gated_pool({ max_workers = 1 })
      local a = hold(p, g, "a")
      local t0 = now()
      local ok, err = p:run(function() return "b" end, { pool_timeout = 100 })
      local took = now() - t0
      assert_reject("PoolTimeout", ok, err)
      assert.are.equal("string", type(err.message))
      assert.is_true(#err.message > 0)
      assert.is_true(took >= 0.09, "gave up after " .. took .. " s")
      H.assert_ended_by(took, 100)
      -- async: the job comes back, and its await gives the reject.
      local job = assert(p:async(function() return "c" end, { pool_timeout = 50 }))
      assert_reject("PoolTimeout", job:await())
      assert_stats(p, { rejected_pool_timeout = 2, rejected = 2, started = 1, processes_started = 1,
        queued = 0 })
      release(g, { a, "a" })
    end)

    it("a job bigger than the pool's whole memory budget is rejected at once, even with pool_timeout",
      function()
        local p = pool({ max_memory_bytes = 10 * KiB })
        local t0 = now()
        assert_reject("InsufficientMemory",
          p:run(function() end, { max_heap_bytes = 11 * KiB, pool_timeout = 5000 }))
        assert_reject("InsufficientMemory",
          p:async(function() end, { max_heap_bytes = 11 * KiB, pool_timeout = 5000 }))
        -- Also when it is a pool up the chain that is too small.
        local child = pool({ delegate_to = p })
        assert_reject("InsufficientMemory",
          child:run(function() end, { max_heap_bytes = 11 * KiB, pool_timeout = 5000 }))
        -- And a pool without slots at all.
        local none = pool({ max_workers = 0 })
        assert_reject("NoWorkersAvailable", none:run(function() end, { pool_timeout = 5000 }))
        assert.is_true(now() - t0 < 2, "waited " .. (now() - t0) .. " s")
        assert.are.equal(0, p:stats().queued)
        assert.are.equal(0, p:stats().processes_started)
      end)

    it("a queued job can be killed by name and by ref, and flush counts queued jobs", function()
      local p, g = gated_pool({ max_workers = 1 })
      local running = hold(p, g, "r")
      local q1 = assert(p:async(spin, { pool_timeout = 20000, task_name = "queued" }))
      local q2 = assert(p:async(spin, { pool_timeout = 20000 }))
      local q3 = assert(p:async(spin, { pool_timeout = 20000 }))
      local q4 = assert(p:async(spin, { pool_timeout = 20000 }))
      assert.are.equal(4, p:stats().queued)
      assert.are.equal(1, p:kill("queued"))
      assert_killed(q1:await())
      local mine = { type = "Dropped", message = "dropped" }
      assert.is_true(p:kill_by_ref(q2, mine))
      assert_killed_with(mine, q2:await())
      assert.are.equal(2, p:stats().queued)
      -- flush takes the running job and the queued ones alike.
      assert.are.equal(3, p:flush())
      assert_killed(q3:await())
      assert_killed(q4:await())
      assert_killed(running:await())
      assert.are.equal(1, p:stats().processes_started) -- queued jobs never got a process
      assert.are.equal(1, p:stats().started)
    end)

    it("a queued job starts when its pools have room, however many other tenants wait", function()
      -- 70 tenants at their limit of one job each, each with a second job
      -- waiting; then one tenant's running job ends: its waiting job must
      -- start at once, whatever waits ahead of it in the queue.
      local root, g = gated_pool({ max_workers = 200 })
      local tenants, running, waiting = {}, {}, {}
      for i = 1, 70 do
        tenants[i] = pool({ delegate_to = root, max_workers = 1 })
        running[i] = hold(tenants[i], g, "r" .. i)
        waiting[i] = assert(tenants[i]:async(function() return "w" end, { pool_timeout = 20000 }))
      end
      assert.are.equal(70, root:stats().running)
      assert.is_true(tenants[70]:kill_by_ref(running[70]))
      assert_killed(running[70]:await())
      assert(wait_until(function() return waiting[70]:done() end, 5),
        "the last tenant's job still waits with its pools free")
      assert.are.same({ true, "w" }, { waiting[70]:await() })
      assert.are.equal(69, root:stats().running)
      assert.are.equal(0, tenants[70]:stats().queued)
    end)

    it("a waiting job of a delegate_fun pool starts in whichever candidate frees first", function()
      local even_root = pool({ max_workers = 1 })
      local odd_root = pool({ max_workers = 1 })
      local child = pool({ delegate_fun = function() return { even_root, odd_root } end })
      local g_even, g_odd = new_gate(), new_gate()
      local e = hold(even_root, g_even, "e")
      local o = hold(odd_root, g_odd, "o")
      local job = assert(child:async(function() return "queued" end, { pool_timeout = 20000 }))
      assert.are.equal(1, child:stats().queued)
      release(g_odd, { o, "o" }, { job, "queued" })
      assert.are.equal(2, odd_root:stats().succeeded)
      assert.are.equal(0, even_root:stats().succeeded)
      release(g_even, { e, "e" })
    end)

    it("closing a pool kills its waiting jobs too", function()
      local root = pool({ max_workers = 1 })
      local child, g = gated_pool({ delegate_to = root })
      local running = hold(root, g, "r")
      local q1 = assert(child:async(spin, { pool_timeout = 20000 }))
      local q2 = assert(root:async(spin, { pool_timeout = 20000 }))
      child:close()
      assert_killed(q1:await())
      assert.are.equal(1, root:stats().queued)
      root:close()
      assert_killed(q2:await())
      assert_killed(running:await())
      assert.are.equal(1, root:stats().processes_started)
    end)

    it("a queued job can be killed from a pool up its chain", function()
      local root = pool({ max_workers = 1 })
      local child, g = gated_pool({ delegate_to = root })
      local running = hold(root, g, "r")
      local q = assert(child:async(spin, { pool_timeout = 20000, task_name = "q" }))
      assert.are.equal(1, root:kill("q"))
      assert_killed(q:await())
      release(g, { running, "r" })
    end)
  end)

  -------------------------------------------------------------------------
  describe("registry and lifetime", function()
    it("handler.pools[name] holds a named pool until close; a taken name raises", function()
      local p = pool({ name = "tenant_a" })
      assert.are.equal(p, handler.pools.tenant_a)
      local ok, err = pcall(function() handler.pool({ name = "tenant_a", max_workers = 3 }) end)
      assert.is_false(ok)
      assert.matches("tenant_a", err, 1, true)
      assert.is_nil(handler.pools.unnamed)
      local anon = pool({})
      for _, v in pairs(handler.pools) do assert.are_not.equal(anon, v) end
      p:close()
      assert.is_nil(handler.pools.tenant_a)
      -- The name is free again.
      local again = pool({ name = "tenant_a" })
      assert.are.equal(again, handler.pools.tenant_a)
      assert.are_not.equal(p, again)
    end)

    it("pool:close() kills its jobs and ends its processes", function()
      local p, g = gated_pool({ name = "closing", max_workers = 5 })
      local before = set_of(workers())
      assert.are.same({ true, 1 }, { p:run(function() return 1 end) })
      local idle_pid = new_workers(before)[1]
      assert.is_not_nil(idle_pid)
      before = set_of(workers())
      local a = hold(p, g, 1)
      local b = hold(p, g, 2, { task_name = "b" })
      local busy
      assert(wait_until(function()
        busy = new_workers(before)
        return #busy == 1 -- one new process; the other job reuses the idle one
      end))
      p:close()
      assert_killed(a:await())
      assert_killed(b:await())
      assert.is_nil(handler.pools.closing)
      assert_empty(p)
      for _, pid in ipairs({ idle_pid, busy[1] }) do
        assert(wait_until(function() return not alive(pid) end), "worker " .. pid .. " outlived close")
      end
      assert(wait_until(function() return p:stats().processes == 0 end))
      -- A closed pool takes no more jobs; closing twice is fine.
      local ok = pcall(function() p:run(function() end) end)
      assert.is_false(ok)
      p:close()
    end)

    it("closing a root pool kills the jobs delegated to it", function()
      local root = pool({})
      local child, g = gated_pool({ delegate_to = root })
      local job = hold(child, g, 1)
      root:close()
      assert_killed(job:await())
      assert_empty(child)
    end)

    it("a pool that is garbage-collected leaves no worker behind", function()
      -- Inside a function, so no stack slot of ours keeps the pool alive.
      local before = set_of(workers())
      local function use_and_drop()
        local p = handler.pool({ max_workers = 3 })
        assert.are.same({ true, 1 }, { p:run(function() return 1 end) })
      end
      use_and_drop()
      local pid = new_workers(before)[1]
      assert.is_not_nil(pid)
      assert.is_true(alive(pid))
      collectgarbage()
      collectgarbage()
      assert(wait_until(function() return not alive(pid) end), "worker of a collected pool lives on")
      assert(wait_until(function() return #mine() == 0 end))
    end)

    it("a dropped pool with a job still running leaves no worker behind once the job ends", function()
      local g = new_gate()
      local before = set_of(workers())
      local function start_and_drop()
        local p = handler.pool({})
        hold(p, g, 1)
      end
      start_and_drop()
      local pid = new_worker(before)
      assert(pid, "no new worker")
      collectgarbage()
      collectgarbage()
      open_gate(g)
      assert(wait_until(function() return not alive(pid) end), "worker of a dropped pool lives on")
      assert(wait_until(function() return #mine() == 0 end))
    end)

    -- A subprocess host: starts a pool with an idle and a busy worker, prints
    -- the pids of its supervisor and workers, then ends as `how` says.
    local function host_script(how)
      return format([[
package.path = %q
package.cpath = %q
local handler = require("handler")
local p = handler.pool({ max_workers = 4 })
-- One busy worker, then one idle: the quick job needs a second process.
local busy = assert(p:async(function() while true do end end))
assert(p:run(function() return 1 end))
local deadline = os.time() + 10
local pids
repeat
  handler.step()
  pids = handler._core.procs()
until (#pids == 2 and pids.supervisor) or os.time() > deadline
assert(#pids == 2, "expected two workers")
io.write(pids.supervisor, " ", pids[1], " ", pids[2], "\n")
io.flush()
local how = %q
if how == "exit" then os.exit(0) end
if how == "kill" then
  local f = io.open("/proc/self/stat")
  local me = f:read("*n")
  f:close()
  os.execute("kill -9 " .. me)
end
]], package.path, package.cpath, how)
    end

    for _, how in ipairs({ "end", "exit", "kill" }) do
      it("a process that exits leaves no worker behind (" .. how .. ")", function()
        local script = tmpname("host") .. ".lua"
        write_file(script, host_script(how))
        -- Output to a file, not a pipe: workers inherit the host's stdout.
        local outfile = script .. ".out"
        os.execute("luajit " .. shell_quote(script) .. " >" .. shell_quote(outfile) .. " 2>&1")
        local out = read_file(outfile) or ""
        local sup, idle, busy = out:match("^(%d+) (%d+) (%d+)\n")
        assert(sup, "host printed: " .. out)
        for _, pid in ipairs({ sup, idle, busy }) do
          assert(wait_until(function() return not alive(tonumber(pid)) end),
            "process " .. pid .. " outlived its host (" .. how .. ")")
        end
      end)
    end

    it("starts processes lazily: max_workers = 100 running one job starts one process", function()
      local p = pool({ max_workers = 100 })
      assert.are.same({ true, 1 }, { p:run(function() return 1 end) })
      assert.are.equal(1, p:stats().processes_started)
      assert.are.equal(1, p:stats().processes)
      assert(wait_until(function() return #mine() == 1 end), #mine() .. " workers")
      local fresh = pool({ max_workers = 100 })
      assert.are.equal(0, fresh:stats().processes_started)
    end)

    it("reuses worker processes across jobs", function()
      local p = pool({ max_workers = 4 })
      local before = set_of(workers())
      assert.are.same({ true, 0 }, { p:run(function() return 0 end) })
      local first = new_workers(before)
      assert.are.equal(1, #first)
      for i = 1, 20 do
        assert.are.same({ true, i }, { p:run(function() return i end) })
        assert.are.same(first, new_workers(before), "job " .. i .. " ran elsewhere")
      end
      -- A job that raises leaves its process fit for the next one.
      assert.is_false((p:run(function() error("x") end)))
      assert.are.same({ true, "again" }, { p:run(function() return "again" end) })
      assert.are.same(first, new_workers(before))
      assert.are.equal(1, p:stats().processes_started)
    end)

    it("idle worker processes end after idle_ms, even while another pool keeps its workers longer",
      function()
      -- A pool with the default idle_ms (10 s) has an idle worker first.
      local long = pool({})
      assert.are.same({ true, 0 }, { long:run(function() return 0 end) })
      local p = pool({ idle_ms = 50 })
      local before = set_of(workers())
      assert.are.same({ true, 1 }, { p:run(function() return 1 end) })
      local pid = new_workers(before)[1]
      assert.is_not_nil(pid)
      assert(wait_until(function() return not alive(pid) end), "idle worker lives on")
      assert(wait_until(function() return p:stats().processes == 0 end))
      assert.are.same({ true, 2 }, { p:run(function() return 2 end) })
      assert.are.equal(2, p:stats().processes_started)
      assert.are.equal(1, long:stats().processes) -- still kept
    end)
  end)

  -------------------------------------------------------------------------
  describe("stats", function()
    it("has the fields docs/API.md names and the dashboard counters", function()
      local p = pool({ max_workers = 7, max_memory_bytes = 123 * KiB })
      local s = p:stats()
      for _, k in ipairs({ "running", "queued", "bytes_committed", "max_workers", "max_memory_bytes",
        "processes", "processes_started", "started", "succeeded", "failed", "failed_timeout",
        "failed_oom", "failed_error", "failed_exit", "failed_other", "killed", "rejected",
        "rejected_no_workers", "rejected_insufficient_memory", "rejected_pool_timeout" }) do
        assert.are.equal("number", type(s[k]), k)
      end
      assert.are.equal(7, s.max_workers)
      assert.are.equal(123 * KiB, s.max_memory_bytes)
      local d = pool({}):stats()
      assert.are.equal(100, d.max_workers)
      assert.are.equal(10 * 2 ^ 30, d.max_memory_bytes)
    end)

    it("counts started, succeeded, failed by type, killed and rejected by type", function()
      local p, g = gated_pool({ max_workers = 2, max_memory_bytes = 1024 * KiB })
      local small = { max_heap_bytes = 64 * KiB }
      assert.is_true((p:run(function() return 1 end, small)))
      assert.is_true((p:run(function() return 2 end, small)))
      assert.is_false((p:run(function() error("e") end, small)))
      assert.is_false((p:run(spin, { max_heap_bytes = 64 * KiB, max_ms = 20 })))
      assert.is_false((p:run(function() local t = {} for i = 1, 1e7 do t[i] = i end end, small)))
      assert.is_false((p:run(function() os.exit(2) end, small)))
      assert.is_false((p:run(function() require("ffi").cast("int *", 0)[0] = 1 end, small)))
      assert.is_false((p:run(function() return coroutine.create(print) end, small)))
      local k = hold(p, g, 1, small)
      assert.is_true(p:kill_by_ref(k))
      assert_reject("InsufficientMemory", p:run(function() end, { max_heap_bytes = 2048 * KiB }))
      local busy1 = hold(p, g, 1, small)
      local busy2 = hold(p, g, 2, small)
      assert_reject("NoWorkersAvailable", p:run(function() end, small))
      assert_reject("PoolTimeout", p:run(function() end, { max_heap_bytes = 64 * KiB, pool_timeout = 10 }))
      local s = p:stats()
      assert.are.equal(2, s.running)
      assert.are.equal(128 * KiB, s.bytes_committed)
      open_gate(g)
      assert.is_true((busy1:await()))
      assert.is_true((busy2:await()))
      s = p:stats()
      assert.are.same({
        started = 11, succeeded = 4,
        failed_error = 1, failed_timeout = 1, failed_oom = 1, failed_exit = 2, failed_other = 1,
        killed = 1, failed = 7,
        rejected = 3, rejected_no_workers = 1, rejected_pool_timeout = 1,
        rejected_insufficient_memory = 1,
        running = 0, queued = 0, bytes_committed = 0,
      }, {
        started = s.started, succeeded = s.succeeded,
        failed_error = s.failed_error, failed_timeout = s.failed_timeout, failed_oom = s.failed_oom,
        failed_exit = s.failed_exit, failed_other = s.failed_other,
        killed = s.killed, failed = s.failed,
        rejected = s.rejected, rejected_no_workers = s.rejected_no_workers,
        rejected_pool_timeout = s.rejected_pool_timeout,
        rejected_insufficient_memory = s.rejected_insufficient_memory,
        running = s.running, queued = s.queued, bytes_committed = s.bytes_committed,
      })
      -- processes counts the live ones (killed ones until their exit is
      -- reported; workers that ran io end after their job): once those are
      -- gone, no more than max_workers stay.
      assert(wait_until(function()
        local n = p:stats().processes
        return n == #mine() and n <= 2
      end), format("processes %d, live workers %d", p:stats().processes, #mine()))
    end)

    it("counts the rejects of a pool whose delegate_fun offers no candidate", function()
      local closed = pool({})
      closed:close()
      local g = pool({ delegate_fun = function(param)
        if param == "closed" then return { closed } end
        return {}
      end })
      assert_reject("NoWorkersAvailable", g:run(function() end))
      assert_reject("NoWorkersAvailable", g:async(function() end))
      assert_reject("NoWorkersAvailable", g:run(function() end, { delegate_param = "closed" }))
      local s = g:stats()
      assert.are.equal(3, s.rejected_no_workers)
      assert.are.equal(3, s.rejected)
    end)
  end)
end)
