-- wrk script for bench/run.sh and bench/instructions.sh: 8 requests written at once on each
-- connection (pipelining depth 8)
init = function(args)
  local r = {}
  for i = 1, 8 do r[i] = wrk.format(nil, "/") end
  req = table.concat(r)
end
request = function() return req end
