-- pool_random_spec.lua: a seeded random workout of composed pools:
-- thousands of jobs with random outcomes, random kills by name, by
-- ref and by flush, many in flight at once across a root, two children and a
-- grandchild routed by delegate_fun. Afterwards every pool is empty, every
-- job ended exactly once the way it was asked to (or the way it was killed),
-- and no worker process is stuck.
--
-- HANDLER_RANDOM_SEED=<n> replays a run's choices (timing still varies).
local handler = require("handler")
local H = require("spec.support.helpers")

local format, concat = string.format, table.concat
local ipairs, pairs, tostring, type = ipairs, pairs, tostring, type
local random = math.random
local now, wait_until = H.now, H.wait_until

local N_JOBS = 2000
local MAX_IN_FLIGHT = 10
local KiB, MiB = 1024, 1024 * 1024

---------------------------------------------------------------------------
-- What a job is asked to do, and what it must then return (unless killed).

local KINDS = {
  -- name, weight
  { "ok", 30 }, { "slow", 10 }, { "error", 10 }, { "timeout", 8 }, { "block", 12 },
  { "oom", 10 }, { "exit", 5 }, { "segv", 5 }, { "big", 5 }, { "table", 5 },
}
local KIND_TOTAL = 0
for _, k in ipairs(KINDS) do KIND_TOTAL = KIND_TOTAL + k[2] end

local function pick_kind()
  local r = random(KIND_TOTAL)
  for _, k in ipairs(KINDS) do
    r = r - k[2]
    if r <= 0 then return k[1] end
  end
end

local waiter = H.job_bodies().waiter

-- The check of a job that ends as a Timeout after max_ms.
local function timed_out(max_ms)
  return function(ok, e)
    return ok == false and e.type == "Timeout"
      and e.message == "Took more than " .. max_ms .. "ms to complete"
  end
end

-- Builds a job: its function, options and the check of its natural outcome.
local function make_job(id, kind, gate_path)
  local heap = ({ 64 * KiB, 256 * KiB, 512 * KiB, 1 * MiB })[random(4)]
  local max_ms = 30000
  local fn, check
  if kind == "ok" then
    local v = id * 3
    fn = function() return v end
    check = function(ok, r) return ok == true and r == v end
  elseif kind == "table" then
    local n = random(50)
    fn = function()
      local t = {}
      for i = 1, n do t[i] = { i = i, s = "x" .. i } end
      t.self = t
      return t, n
    end
    check = function(ok, r, n2)
      return ok == true and type(r) == "table" and #r == n and r.self == r and n2 == n
        and r[n] ~= nil and r[n].s == "x" .. n
    end
  elseif kind == "slow" then
    local ms = random(2, 15)
    fn = function()
      local stop = os.clock() + ms / 1000
      while os.clock() < stop do end
      return "slept"
    end
    check = function(ok, r) return ok == true and r == "slept" end
  elseif kind == "error" then
    local msg = "E" .. id
    fn = function() error(msg) end
    check = function(ok, e)
      return ok == false and e.type == "ProcessExit" and type(e.reason) == "string"
        and e.reason:sub(-#msg) == msg and e.message == "Process exited with " .. e.reason
    end
  elseif kind == "timeout" then
    max_ms = random(10, 60)
    fn = function() while true do end end
    check = timed_out(max_ms)
  elseif kind == "block" then
    -- Waits on a gate that stays shut: ends by its timeout or a kill.
    max_ms = random(40, 250)
    fn = waiter(gate_path, "released")
    check = timed_out(max_ms)
  elseif kind == "oom" then
    heap = ({ 16 * KiB, 64 * KiB, 256 * KiB })[random(3)]
    fn = function()
      local t = {}
      for i = 1, 1e8 do t[i] = i end
      return #t
    end
    check = function(ok, e)
      return ok == false and e.type == "OOM"
        and e.message == "Process tried to use more than " .. heap .. " bytes of memory"
    end
  elseif kind == "big" then
    -- Asks for more memory than any pool has: rejected or queued in vain.
    heap = 64 * MiB
    fn = function() return "never" end
    check = function() return false end
  elseif kind == "exit" then
    local code = random(1, 60) -- 73..75 are the supervisor's own exit codes
    fn = function() os.exit(code) end
    check = function(ok, e)
      return ok == false and e.type == "ProcessExit" and e.reason == "exit " .. code
    end
  elseif kind == "segv" then
    heap = 256 * KiB
    fn = function() require("ffi").cast("int *", 0)[0] = 1 end
    check = function(ok, e)
      return ok == false and e.type == "ProcessExit" and e.reason == "SIGSEGV"
    end
  end
  return fn, { max_ms = max_ms, max_heap_bytes = heap }, check
end

describe("handler pools, randomized", function()
  it("thousands of jobs with random outcomes and random kills across composed pools", function()
    local seed = tonumber(os.getenv("HANDLER_RANDOM_SEED") or "") or (os.time() % 1000000)
    math.randomseed(seed)
    print(format("\npool_random_spec: seed %d (HANDLER_RANDOM_SEED=%d replays it)", seed, seed))

    local dir = H.tmpdir()
    -- Workers alive before (another spec's idle ones) are not ours to check.
    local preexisting = H.set_of(H.workers())
    local function mine() return H.new_workers(preexisting) end

    -- Warm up, so the fd baseline includes the supervisor's socket.
    local warm = handler.pool({ idle_ms = 0 })
    assert(warm:run(function() end))
    warm:close()
    assert(wait_until(function() return #mine() == 0 end))
    local baseline = H.fd_baseline()

    -- "block" jobs wait on this gate, which stays shut.
    local gate = dir .. "/gate"
    H.mkfifo(gate)
    local gate_holder = assert(io.open(gate, "r+"))
    local pools = {}
    finally(function()
      -- Also when an assertion failed half-way: nothing of ours stays.
      for _, p in ipairs(pools) do p:close() end
      if gate_holder then gate_holder:close() end
      H.rm_r(dir)
    end)

    local root = handler.pool({ name = "rnd_root", max_workers = 10, max_memory_bytes = 5 * MiB })
    local a = handler.pool({ name = "rnd_a", delegate_to = root, max_workers = 5,
      max_memory_bytes = 2 * MiB })
    local b = handler.pool({ name = "rnd_b", delegate_to = "rnd_root", max_workers = 4,
      max_memory_bytes = 3 * MiB })
    local g = handler.pool({
      name = "rnd_g",
      max_workers = 6,
      delegate_fun = function(param)
        if param % 5 == 0 then return {} end
        if param % 2 == 0 then return { a, b } end
        return { b, a }
      end,
    })
    pools[1], pools[2], pools[3], pools[4] = root, a, b, g
    local names = { [root] = "root", [a] = "a", [b] = "b", [g] = "g" }

    local jobs = {}       -- every job submitted, accepted or not
    local in_flight = {}  -- accepted jobs not yet awaited
    local submitted = 0
    local seen_pids = {}
    local function note_workers()
      for _, pid in ipairs(mine()) do seen_pids[pid] = true end
    end

    local function submit()
      submitted = submitted + 1
      local id = submitted
      local kind = pick_kind()
      local fn, opts, check = make_job(id, kind, gate)
      local origin = pools[random(#pools)]
      opts.task_name = "t" .. random(12)
      local param = random(1000)
      if origin == g then
        opts.delegate_param = param
      elseif random(3) == 1 then
        opts.pool_timeout = random(0, 150)
      end
      local rec = { id = id, kind = kind, origin = origin, opts = opts, check = check,
        param = param }
      jobs[#jobs + 1] = rec
      local a_before = a:stats().running
      local job, err = origin:async(fn, opts)
      if job == nil then
        assert(type(err) == "table" and err.rejected == true, "async returned no job and no reject")
        -- delegate_fun gave no candidate: rejected before the core saw it.
        rec.no_candidate = origin == g and param % 5 == 0
        rec.done, rec.ok, rec.result = true, false, err
        rec.rejected_at_submit = true
        return
      end
      rec.job = job
      -- The pools the job holds (or, queued, waits for) budget in.
      if origin == root then
        rec.chain = { [root] = true }
      elseif origin == a then
        rec.chain = { [a] = true, [root] = true }
      elseif origin == b then
        rec.chain = { [b] = true, [root] = true }
      else
        local via = a:stats().running > a_before and a or b
        rec.chain = { [g] = true, [via] = true, [root] = true }
      end
      in_flight[#in_flight + 1] = rec
    end

    local function resolve(rec, ...)
      assert(not rec.done, "job " .. rec.id .. " resolved twice")
      rec.done = true
      rec.ok, rec.result, rec.result2 = ...
    end

    local function remove_in_flight(i)
      in_flight[i] = in_flight[#in_flight]
      in_flight[#in_flight] = nil
    end

    local function reap_done()
      local i = 1
      while i <= #in_flight do
        local rec = in_flight[i]
        if rec.job:done() then
          resolve(rec, rec.job:await())
          remove_in_flight(i)
        else
          i = i + 1
        end
      end
    end

    -- Jobs a kill from `pool` would reach: not done, and `pool` in their chain.
    local function targets(pool, name)
      local out = {}
      for _, rec in ipairs(in_flight) do
        if rec.chain[pool] and not rec.job:done() and (name == nil or rec.opts.task_name == name) then
          out[#out + 1] = rec
        end
      end
      return out
    end

    local kills = { by_name = 0, by_ref = 0, flush = 0, jobs = 0 }
    local function kill_err()
      if random(2) == 1 then return nil end
      return { type = "RandomKill", message = "killed at random", n = random(1000) }
    end
    local function mark_killed(list, err)
      for _, rec in ipairs(list) do
        rec.killed_with = err or "default"
        assert(rec.job:done(), "a killed job is not done at once")
      end
      kills.jobs = kills.jobs + #list
    end

    local function random_kill()
      local pool = pools[random(#pools)]
      local r = random(10)
      local err = kill_err()
      if r <= 4 then
        local name = "t" .. random(12)
        local expect = targets(pool, name)
        local n = pool:kill(name, err)
        assert(n == #expect, format("kill(%s, %s) killed %d, expected %d (seed %d)",
          names[pool], name, n, #expect, seed))
        mark_killed(expect, err)
        kills.by_name = kills.by_name + 1
      elseif r <= 8 then
        if #in_flight == 0 then return end
        local rec = in_flight[random(#in_flight)]
        local reach = rec.chain[pool] and not rec.job:done()
        local ok, why = pool:kill_by_ref(rec.job, err)
        if reach then
          assert(ok == true, format("kill_by_ref(%s) of job %d: %s (seed %d)", names[pool], rec.id,
            tostring(why), seed))
          mark_killed({ rec }, err)
        else
          assert(ok == false and why == "no_such_worker",
            format("kill_by_ref(%s) of job %d unreachable gave %s (seed %d)", names[pool], rec.id,
              tostring(ok), seed))
        end
        kills.by_ref = kills.by_ref + 1
      else
        local expect = targets(pool)
        local n = pool:flush(err)
        assert(n == #expect, format("flush(%s) killed %d, expected %d (seed %d)", names[pool], n,
          #expect, seed))
        mark_killed(expect, err)
        kills.flush = kills.flush + 1
      end
    end

    -- root.running counts every running job, each pool's queued its own
    -- waiting ones: together, every job not done.
    local function check_counts()
      local not_done = 0
      for _, rec in ipairs(in_flight) do
        if not rec.job:done() then not_done = not_done + 1 end
      end
      local queued = 0
      for _, p in ipairs(pools) do queued = queued + p:stats().queued end
      local rs = root:stats()
      assert(rs.running + queued == not_done, format(
        "root running %d + queued %d ~= %d jobs not done (seed %d)", rs.running, queued, not_done,
        seed))
      for _, p in ipairs(pools) do
        local s = p:stats()
        assert(s.running <= s.max_workers, names[p] .. " runs more than max_workers")
        assert(s.bytes_committed <= s.max_memory_bytes, names[p] .. " commits more than its budget")
        assert(s.running >= 0 and s.bytes_committed >= 0, names[p] .. " went negative")
      end
    end

    local t0 = now()
    local steps = 0
    while submitted < N_JOBS or #in_flight > 0 do
      steps = steps + 1
      local r = random(100)
      if submitted < N_JOBS and #in_flight < MAX_IN_FLIGHT and r <= 55 then
        submit()
      elseif r <= 85 then
        handler.step()
        reap_done()
        if #in_flight >= MAX_IN_FLIGHT or submitted >= N_JOBS then
          -- Nothing else to do: wait for one job.
          local i = random(#in_flight)
          local rec = in_flight[i]
          if rec then
            resolve(rec, rec.job:await())
            remove_in_flight(i)
          end
        end
      elseif r <= 93 then
        random_kill()
      else
        check_counts()
        note_workers()
      end
    end
    local took = now() - t0

    -- Every job ended exactly once, consistently with what it was asked.
    local tally = {}
    local function count(k) tally[k] = (tally[k] or 0) + 1 end
    for _, rec in ipairs(jobs) do
      assert(rec.done, "job " .. rec.id .. " never resolved")
      local ok, res = rec.ok, rec.result
      local what = format("job %d (%s in %s, opts max_ms=%s heap=%s pool_timeout=%s) -> %s %s (seed %d)",
        rec.id, rec.kind, names[rec.origin], tostring(rec.opts.max_ms),
        tostring(rec.opts.max_heap_bytes), tostring(rec.opts.pool_timeout), tostring(ok),
        type(res) == "table" and tostring(res.type) .. ": " .. tostring(res.message) or tostring(res),
        seed)
      if rec.job then
        assert(rec.job:done(), what)
        -- Awaiting again gives the same outcome.
        local ok2, res2 = rec.job:await()
        assert(ok2 == ok, what)
        if type(res) == "table" and res.type then assert(res2.type == res.type, what) end
      end
      if rec.killed_with then
        local want = rec.killed_with == "default"
          and { type = "ProcessExit", message = "User killed the process", reason = "user_killed",
            cause = "killed" }
          or rec.killed_with
        assert(ok == false and type(res) == "table", what)
        for k, v in pairs(want) do assert(res[k] == v, what .. ": field " .. k) end
        for k in pairs(res) do assert(want[k] ~= nil, what .. ": extra field " .. k) end
        count("killed")
      elseif ok == false and type(res) == "table" and res.rejected then
        assert(res.type == "NoWorkersAvailable" or res.type == "InsufficientMemory"
          or res.type == "PoolTimeout", what)
        if res.type == "PoolTimeout" then
          assert(rec.opts.pool_timeout and rec.opts.pool_timeout > 0, what)
          assert(not rec.rejected_at_submit, what)
        else
          assert(rec.rejected_at_submit, what)
        end
        if res.type == "NoWorkersAvailable" then
          assert(res.message == "No workers available", what)
        elseif res.type == "InsufficientMemory" then
          assert(res.message == "Not enough memory available", what)
        end
        count(res.type)
      else
        assert(ok ~= nil and not (type(res) == "table" and res.reason == "user_killed"),
          "unmarked kill: " .. what)
        assert(rec.check(ok, res, rec.result2), "unexpected outcome: " .. what)
        count(rec.kind)
      end
      if rec.kind == "big" then
        assert(rec.killed_with or (type(res) == "table" and res.rejected), what)
      end
    end

    -- The pools are empty and their counters agree with the outcomes.
    for _, p in ipairs(pools) do
      local s = p:stats()
      assert.are.equal(0, s.running, names[p])
      assert.are.equal(0, s.bytes_committed, names[p])
      assert.are.equal(0, s.queued, names[p])
    end
    local rs = root:stats()
    assert.are.equal((tally.ok or 0) + (tally.slow or 0) + (tally.table or 0), rs.succeeded)
    assert.are.equal((tally.timeout or 0) + (tally.block or 0), rs.failed_timeout)
    assert.are.equal(tally.oom or 0, rs.failed_oom)
    assert.are.equal(tally.error or 0, rs.failed_error)
    assert.are.equal((tally.exit or 0) + (tally.segv or 0), rs.failed_exit)
    local rejected = { NoWorkersAvailable = 0, InsufficientMemory = 0, PoolTimeout = 0 }
    for _, p in ipairs(pools) do
      local s = p:stats()
      rejected.NoWorkersAvailable = rejected.NoWorkersAvailable + s.rejected_no_workers
      rejected.InsufficientMemory = rejected.InsufficientMemory + s.rejected_insufficient_memory
      rejected.PoolTimeout = rejected.PoolTimeout + s.rejected_pool_timeout
    end
    -- Rejects for want of any candidate are made in Lua; pool_spec checks
    -- that they are counted too, so a miss there does not hide the rest here.
    local no_candidate = 0
    for _, rec in ipairs(jobs) do
      if rec.no_candidate then no_candidate = no_candidate + 1 end
    end
    if rejected.NoWorkersAvailable + no_candidate == (tally.NoWorkersAvailable or 0) then
      rejected.NoWorkersAvailable = rejected.NoWorkersAvailable + no_candidate
    end
    for k, v in pairs(rejected) do assert.are.equal(tally[k] or 0, v, k) end

    -- No worker is stuck: each one left is an idle sleeper of the root.
    H.assert_idle(mine, function() return root:stats().processes == #mine() end,
      format(" (seed %d)", seed))
    note_workers()

    local parts = {}
    for k, v in pairs(tally) do parts[#parts + 1] = k .. "=" .. v end
    table.sort(parts)
    print(format("pool_random_spec: %d jobs in %.1f s, %d steps, %d processes started; kills: "
      .. "%d by name, %d by ref, %d flushes, %d jobs killed", #jobs, took, steps,
      root:stats().processes_started, kills.by_name, kills.by_ref, kills.flush, kills.jobs))
    print("pool_random_spec: outcomes: " .. concat(parts, " "))

    -- Closing ends every process, and nothing of ours stays open.
    for i = #pools, 1, -1 do pools[i]:close() end
    for _, name in ipairs({ "rnd_root", "rnd_a", "rnd_b", "rnd_g" }) do
      assert.is_nil(handler.pools[name])
    end
    local pids = {}
    for pid in pairs(seen_pids) do pids[#pids + 1] = pid end
    H.assert_workers_gone(mine, pids)
    gate_holder:close()
    gate_holder = nil
    H.assert_fds_back(baseline)
  end)
end)
