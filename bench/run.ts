/**
 * `npm run bench`: runs every benchmark script under bench/ in turn, each in its own process so
 * peak-RSS figures are per benchmark. Each script measures its reference tools (cp, zstd, nbdcopy,
 * sha256sum…) in the same run and prints ratios; this driver only sequences them.
 *
 * Usage: npm run bench [-- name…]   (names: the script file names without .ts, e.g. vma)
 */
import { spawnSync } from "node:child_process"
import { readdirSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const here = dirname(fileURLToPath(import.meta.url))
const wanted = process.argv.slice(2)
const scripts = readdirSync(here)
  .filter((file) => file.endsWith(".ts") && !file.startsWith(".") && file !== "run.ts" && !file.endsWith(".d.ts"))
  .map((file) => file.slice(0, -3))
  .filter((name) => wanted.length === 0 || wanted.includes(name))
  .sort()

let failed = 0
for (const name of scripts) {
  process.stdout.write(`\n=== bench/${name}.ts ===\n`)
  const result = spawnSync(process.execPath, ["--import", "tsx", join(here, `${name}.ts`)], { stdio: "inherit" })
  if (result.status !== 0) {
    failed++
    process.stdout.write(`bench/${name}.ts exited with ${result.status ?? result.signal}\n`)
  }
}
process.exit(failed > 0 ? 1 : 0)
