import * as Effect from "effect/Effect"
import * as VmaCli from "../src/VmaCli.js"
const t0 = Date.now()
const code = await Effect.runPromise(VmaCli.run(process.argv.slice(2)))
process.stderr.write(`run ${Date.now() - t0} ms, code ${code}\n`)
