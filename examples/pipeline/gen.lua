-- gen.lua N [POISON_PERCENT] [SEED]: writes N JSON lines of customer
-- records to standard output, about 8 fields each (a nested address, a tags
-- array, some nulls); POISON_PERCENT of them (default 0) make the transform
-- hang, allocate without bound, raise or crash.
--   luajit examples/pipeline/gen.lua 50000 0.5 > records.jsonl
local cjson = require("cjson")

local n = tonumber(arg[1]) or 1000
local poison = tonumber(arg[2]) or 0
local seed = tonumber(arg[3]) or 42
math.randomseed(seed)

local CITIES = { "Lyon", "Porto", "Leeds", "Graz", "Turku", "Cork", "Bern", "Gdansk" }
local TAGS = { "new", "vip", "churn-risk", "b2b", "newsletter", "beta" }
local POISONS = { "hang", "alloc", "raise", "crash" }

local out = {}
for i = 1, n do
  local tags = {}
  for _ = 1, math.random(0, 3) do tags[#tags + 1] = TAGS[math.random(#TAGS)] end
  local rec = {
    id = i,
    name = "Customer " .. i,
    email = math.random() < 0.9 and ("c" .. i .. "@example.com") or cjson.null,
    age = math.random() < 0.95 and math.random(18, 90) or cjson.null,
    balance = math.floor(math.random() * 1e6) / 100,
    tags = setmetatable(tags, cjson.array_mt),
    address = { street = math.random(1, 200) .. " Main St", city = CITIES[math.random(#CITIES)],
      zip = tostring(math.random(10000, 99999)) },
    active = math.random() < 0.8,
  }
  if math.random() * 100 < poison then rec.poison = POISONS[math.random(#POISONS)] end
  out[#out + 1] = cjson.encode(rec)
  if #out == 1000 then
    io.write(table.concat(out, "\n"), "\n")
    out = {}
  end
end
if #out > 0 then io.write(table.concat(out, "\n"), "\n") end
