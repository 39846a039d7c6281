-- handler.errors: the error values handler returns, as docs/API.md describes them.
local setmetatable, tostring, type, format, floor =
  setmetatable, tostring, type, string.format, math.floor

local M = {}

-- Every error value shares this metatable: tostring(err) is its message, so
-- error(err) re-raises it cleanly and an uncaught one prints its message.
local meta = {
  __tostring = function(e) return e.message end,
}
M.meta = meta

local function new(t)
  return setmetatable(t, meta)
end
M.new = new

-- Whole numbers print without a decimal point ("10ms", "4096 bytes").
local function num(n)
  if n == floor(n) and n < 2^53 and n > -2^53 then return format("%d", n) end
  return tostring(n)
end
M.num = num

-- cause: "error" (the job raised), "exit" (it called os.exit), "signal"
-- (it died by a signal), "killed" (a user killed it, or the host did for a
-- limit), "lost" (its worker or supervisor vanished).
local function exit(cause, reason, fields)
  local e = fields or {}
  e.type = "ProcessExit"
  e.cause = cause
  e.reason = reason
  e.message = "Process exited with " .. tostring(reason)
  return new(e)
end

function M.user_killed()
  return new({ type = "ProcessExit", message = "User killed the process", reason = "user_killed",
    cause = "killed" })
end

local rejects = {
  NoWorkersAvailable = "No workers available",
  InsufficientMemory = "Not enough memory available",
  PoolTimeout = "Timed out waiting for pool capacity",
}

function M.reject(kind)
  return new({ type = kind, message = rejects[kind], rejected = true })
end

-- Turns what the core reports about a failed job into an error value.
-- kind and a, b come from handler.core; max_ms, heap and cpu_ms are the
-- job's limits.
function M.from_core(max_ms, heap, kind, a, b, cpu_ms)
  if kind == "error" then
    return exit("error", a, { traceback = b })
  elseif kind == "timeout" then
    return new({ type = "Timeout", message = "Took more than " .. num(max_ms) .. "ms to complete" })
  elseif kind == "cputime" then
    return new({ type = "CPUTimeout",
      message = "Used more than " .. num(cpu_ms or 0) .. "ms of CPU time" })
  elseif kind == "oom" then
    return new({ type = "OOM",
      message = "Process tried to use more than " .. num(heap) .. " bytes of memory" })
  elseif kind == "exit" then
    if a == nil then return exit("lost", "exit (status unknown)") end
    return exit("exit", "exit " .. num(a))
  elseif kind == "signal" then
    if a == "SIGSYS" then
      -- The sandbox's seccomp filter kills a process on a forbidden call.
      return new({ type = "SandboxViolation", reason = a,
        message = "Process made a forbidden system call" })
    end
    return exit("signal", a)
  elseif kind == "killed" then
    if type(a) == "table" then return a end
    return M.user_killed()
  elseif kind == "badresult" then
    return exit("error", "result cannot travel: " .. tostring(a))
  elseif kind == "output" then
    -- The host meters the worker's stdout and stderr: past max_output_bytes
    -- the worker is killed, whatever the job was doing.
    return exit("killed", "output limit", { detail = a })
  elseif kind == "badreply" then
    return exit("lost", "bad reply from worker: " .. tostring(a))
  elseif kind == "failed" then
    return exit("lost", tostring(a))
  elseif kind == "forked" then
    -- A job started before a fork, awaited in the child: its worker and
    -- its reply belong to the parent.
    return new({ type = "ProcessExit", reason = "forked", cause = "lost",
      message = "The job was started in another process, before a fork" })
  elseif rejects[kind] then
    return M.reject(kind)
  end
  return exit("lost", "unknown outcome " .. tostring(kind))
end

return M
