-- handler.waitlist: who waits for which job, for hosts that run their own
-- event loop (nginx, luv, cqueues, copas). A waiter is a function, called
-- once, after the loop stepped, when one of the jobs it watches has ended.
-- A host calls step() when handler.fd() is readable; step() runs the loop
-- and calls the waiters of the jobs that ended.

local core = require("handler.core")

local pairs, next = pairs, next
local core_watch, core_step, core_finished, core_id, core_done =
  core.watch, core.step, core.finished, core.job_id, core.done

local M = {}

-- job id -> { [waiter] = job userdata }; waiter -> { [id] = true }.
local by_job, by_waiter = {}, {}
local count = 0

local function drop(waiter)
  local ids = by_waiter[waiter]
  if ids == nil then return end
  by_waiter[waiter] = nil
  count = count - 1
  for id in pairs(ids) do
    local set = by_job[id]
    if set ~= nil then
      set[waiter] = nil
      if next(set) == nil then by_job[id] = nil end
    end
  end
end

--- add(waiter, job_ud) -> done: waiter (a function) is called once when
-- the job ends; true, and nothing is registered, when it has ended already.
function M.add(waiter, job)
  if core_watch(job) then return true end
  local id = core_id(job)
  local set = by_job[id]
  if set == nil then
    set = {}
    by_job[id] = set
  end
  set[waiter] = job
  local ids = by_waiter[waiter]
  if ids == nil then
    ids = {}
    by_waiter[waiter] = ids
    count = count + 1
  end
  ids[id] = true
  return false
end

--- remove(waiter): forgets the waiter (its wait was given up).
M.remove = drop

--- count() -> how many waiters wait.
function M.count()
  return count
end

local function wake(id)
  local set = by_job[id]
  if set == nil then return end
  by_job[id] = nil
  for waiter in pairs(set) do
    drop(waiter)
    waiter()
  end
end

--- step(): runs what is ready in the loop, without blocking, then calls the
-- waiters of the jobs that ended.
function M.step()
  core_step()
  M.wake_ended()
end

--- wake_ended(): calls the waiters of the jobs that ended (for a host that
-- stepped the loop itself).
function M.wake_ended()
  local ids = core_finished()
  if ids == nil then return end
  if ids == false then
    -- The core ran out of memory listing them: look at every watched job.
    local ended = {}
    for id, set in pairs(by_job) do
      local _, job = next(set)
      if core_done(job) then ended[#ended + 1] = id end
    end
    ids = ended
  end
  for i = 1, #ids do wake(ids[i]) end
end

return M
