-- transform.lua: a realistic per-record transform for `handler map`: it
-- normalises a customer record, scores it, and flags it. Some records are
-- poisoned (gen.lua): on those this code hangs, allocates without bound,
-- raises, or crashes through the FFI, as real code on bad data does.
--   handler map examples/pipeline/transform.lua records.jsonl --max-ms 200 > out.jsonl
local M = {}

-- Runs once per worker: what it sets is in every record's fresh state.
function M.init()
  SEGMENTS = { { 0, "small" }, { 1000, "medium" }, { 5000, "large" } }
end

local function segment(balance)
  local name = SEGMENTS[1][2]
  for _, s in ipairs(SEGMENTS) do
    if balance >= s[1] then name = s[2] end
  end
  return name
end

function M.map(r)
  if r.poison == "hang" then while true do end end
  if r.poison == "alloc" then
    local t = {}
    while true do t[#t + 1] = { r } end
  end
  if r.poison == "raise" then error("cannot score customer " .. r.id) end
  if r.poison == "crash" then require("ffi").cast("int *", 0)[0] = 1 end
  local email = type(r.email) == "string" and r.email:lower() or nil
  local tags = {}
  for _, t in ipairs(r.tags or {}) do tags[t] = true end
  return {
    id = r.id,
    name = r.name,
    email = email,
    domain = email and email:match("@(.+)$") or nil,
    city = r.address and r.address.city,
    segment = segment(r.balance or 0),
    score = (r.active and 10 or 0) + (tags.vip and 50 or 0) - (tags["churn-risk"] and 20 or 0)
      + math.min(40, math.floor((r.balance or 0) / 250)),
    adult = type(r.age) == "number" and r.age >= 18 or nil,
  }
end

return M
