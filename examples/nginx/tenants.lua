-- tenants.lua: the Lua side of examples/nginx/nginx.conf. Customers send Lua
-- chunks; each runs as a job in the strict sandbox, in the customer's own
-- pool (2 jobs and 64 MiB at a time, across all nginx workers), which
-- delegates to a shared pool (8 jobs and 256 MiB for everybody). A greedy
-- customer is turned away (429) while the others keep being served.
local handler = require("handler")

local ngx = ngx
local format, tostring, type = string.format, tostring, type

local M = {}

local DICT = "handler_budgets"
local MiB = 1024 * 1024

local JOB = { max_ms = 200, max_heap_bytes = 16 * MiB, max_output_bytes = 0 }

--- init(): in init_by_lua, before nginx forks its workers.
function M.init()
  handler.pool{
    name = "shared", sandbox = "strict", max_workers = 8, max_memory_bytes = 256 * MiB,
    shared_dict = DICT,
  }
end

-- A customer's pool, made in each nginx worker on the customer's first
-- request; its budget is shared by all of them.
local function pool_of(customer)
  local name = "customer:" .. customer
  return handler.pools[name] or handler.pool{
    name = name, delegate_to = "shared", max_workers = 2, max_memory_bytes = 64 * MiB,
    shared_dict = DICT,
  }
end

local STATUS = {
  Timeout = 504, OOM = 507, ProcessExit = 422, SandboxViolation = 403,
}

--- eval(customer): runs the request body as a Lua chunk in the customer's
-- pool and answers with its result, or the error's type and message.
function M.eval(customer)
  ngx.req.read_body()
  local src = ngx.req.get_body_data()
  if src == nil then
    ngx.status = 400
    ngx.say("send a Lua chunk as the request body (at most 64 KiB)")
    return
  end
  -- The chunk is compiled and run in the worker: the host never runs it.
  local ok, res = pool_of(customer):run(function()
    local f, err = loadstring(src, "=request")
    if f == nil then error(err, 0) end
    return f()
  end, JOB)
  if ok then
    ngx.say(type(res) == "table" and "table" or tostring(res))
    return
  end
  ngx.status = res.rejected and 429 or STATUS[res.type] or 500
  ngx.say(res.type, ": ", res.message)
end

--- stats(): this nginx worker's pools, and the budgets all workers share.
function M.stats()
  ngx.say(format("nginx worker %d", ngx.worker.pid()))
  for name, pool in pairs(handler.pools) do
    local s = pool:stats()
    ngx.say(format("  %-20s running %d  queued %d  succeeded %d  failed %d  rejected %d",
      name, s.running, s.queued, s.succeeded, s.failed, s.rejected))
  end
  local dict = ngx.shared[DICT]
  ngx.say("shared budgets (all nginx workers):")
  for _, k in ipairs(dict:get_keys(0)) do
    local pool, what = k:match("^handler|(.-)|([wm])$")
    if pool ~= nil then
      ngx.say(format("  %-20s %s %d", pool, what == "w" and "jobs " or "bytes", dict:get(k)))
    end
  end
end

return M
