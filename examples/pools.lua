-- pools.lua: one host, many tenants. A shared pool holds the machine's
-- memory budget for jobs; each customer gets a pool of its own that delegates
-- to it, with a smaller budget, so no single customer can take the machine.
-- A greedy customer is turned away while the others keep running.
--
-- Run it from a checkout (after tools/build) with:
--   LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;;" LUA_CPATH="$PWD/build/?.so;;" \
--     luajit examples/pools.lua
local handler = require("handler")

local format = string.format
local MiB = 1024 * 1024

local function mib(bytes) return format("%3d MiB", bytes / MiB) end

-- The whole machine: 128 MiB of job heaps, 8 jobs at a time.
local shared = handler.pool({ name = "shared_pool", max_workers = 8, max_memory_bytes = 128 * MiB })

-- Each customer may use at most 48 MiB and 3 jobs of it.
local customers = {}
for _, name in ipairs({ "acme", "globex", "initech" }) do
  customers[name] = handler.pool({
    name = name,
    delegate_to = "shared_pool",
    max_workers = 3,
    max_memory_bytes = 48 * MiB,
  })
end

local function show_pools(title)
  print(title)
  print(format("  %-12s %8s %14s", "pool", "running", "memory held"))
  for _, name in ipairs({ "shared_pool", "acme", "globex", "initech" }) do
    local s = handler.pools[name]:stats()
    print(format("  %-12s %5d/%-2d %s / %s", name, s.running, s.max_workers,
      mib(s.bytes_committed), mib(s.max_memory_bytes)))
  end
  print()
end

-- A customer's report: real work on a table that fits its heap. It runs
-- for a little while, so the jobs below are all in flight at once.
local function report(customer, n)
  return function()
    local rows = {}
    for i = 1, n do rows[i] = (i * 7919) % 1000 end
    local sum = 0
    for _ = 1, 30 do
      for i = 1, n do sum = sum + rows[i] end
    end
    return format("%d rows, total %d", n, sum)
  end
end

-- Submits a job for a customer and tells what happened to the request.
local jobs = {}
local function submit(customer, what, fn, opts)
  local job, err = customers[customer]:async(fn, opts)
  if job then
    print(format("  %-8s %-32s accepted (reserves %s)", customer, what, mib(opts.max_heap_bytes)))
    jobs[#jobs + 1] = { customer = customer, what = what, job = job }
  else
    print(format("  %-8s %-32s REJECTED: %s (%s)", customer, what, err.type, err.message))
  end
  return job
end

print("handler pools: one shared budget, three customers\n")
show_pools("The pools:")

print("Requests come in:")
submit("acme", "report of 200k rows", report("acme", 200000), { max_heap_bytes = 16 * MiB })
submit("globex", "report of 100k rows", report("globex", 100000), { max_heap_bytes = 8 * MiB })
submit("acme", "report of 300k rows", report("acme", 300000), { max_heap_bytes = 24 * MiB })

-- initech wants a lot, and wants it for long: its first huge job fits its
-- own budget, the next ones do not. Its limit, not the machine's, says no.
submit("initech", "import of everything (slow)", function()
  local t = {}
  for i = 1, 1e6 do t[i] = i end
  while true do end -- stuck: it will be stopped below
end, { max_heap_bytes = 40 * MiB, task_name = "initech-import" })
submit("initech", "a second import", report("initech", 1), { max_heap_bytes = 40 * MiB })
submit("initech", "a job bigger than its budget", report("initech", 1),
  { max_heap_bytes = 64 * MiB, pool_timeout = 5000 })

-- Meanwhile the other customers keep getting work done.
submit("globex", "report of 250k rows", report("globex", 250000), { max_heap_bytes = 20 * MiB })
submit("acme", "a small lookup", report("acme", 1000), { max_heap_bytes = 1 * MiB })
print()
show_pools("While they run:")

-- An operator stops the stuck import by its task name; its memory goes back
-- to initech's and to the shared budget at once.
local killed = customers.initech:kill("initech-import")
print(format("Operator: initech:kill(\"initech-import\") stopped %d job.\n", killed))
show_pools("Right after the kill:")

print("Results:")
for _, j in ipairs(jobs) do
  local ok, res = j.job:await()
  if ok then
    print(format("  %-8s %-32s ok: %s", j.customer, j.what, res))
  else
    print(format("  %-8s %-32s failed: %s (%s)", j.customer, j.what, res.type, res.message))
  end
end
print()
show_pools("At the end, every budget is free again:")

local s = shared:stats()
print(format("shared_pool counters: %d started, %d succeeded, %d killed; %d worker processes started",
  s.started, s.succeeded, s.killed, s.processes_started))
local i = customers.initech:stats()
print(format("initech was turned away %d times (%d for memory)", i.rejected,
  i.rejected_insufficient_memory))

for _, p in pairs(customers) do p:close() end
shared:close()
