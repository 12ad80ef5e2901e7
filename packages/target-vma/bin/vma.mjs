#!/usr/bin/env node
// The `vma` command (src/cli.ts).
//
// Node 20 cannot run TypeScript. When `tsc -b` has compiled the package (build/src, as `npm run check` does)
// and no source file is newer than its output, the compiled JavaScript is loaded directly; otherwise the
// sources are loaded through tsx, after importing the JavaScript dependencies natively (through tsx's loader
// hooks they would load three times slower). Either way the behaviour is that of the current sources.
import * as fs from "node:fs"
import { fileURLToPath } from "node:url"

// Reads and writes of pipes to compressors block libuv pool threads: allow more than the default four.
process.env.UV_THREADPOOL_SIZE ??= "8"

const src = fileURLToPath(new URL("../src/", import.meta.url))
const build = fileURLToPath(new URL("../build/src/", import.meta.url))

const compiledIsFresh = () => {
  try {
    for (const entry of fs.readdirSync(src, { recursive: true })) {
      const file = String(entry)
      if (!file.endsWith(".ts")) continue
      const out = `${build}${file.slice(0, -3)}.js`
      if (fs.statSync(out).mtimeMs < fs.statSync(`${src}${file}`).mtimeMs) return false
    }
    return true
  } catch {
    return false
  }
}

if (compiledIsFresh()) {
  await import("../build/src/cli.js")
} else {
  const { register } = await import("tsx/esm/api")
  await Promise.all([
    import("effect/Cause"),
    import("effect/Clock"),
    import("effect/Data"),
    import("effect/Deferred"),
    import("effect/Effect"),
    import("effect/Exit"),
    import("effect/Fiber"),
    import("effect/Option"),
    import("effect/Schema"),
    import("effect/Sink"),
    import("effect/Stream"),
    import("@effect/platform-node/NodeRuntime")
  ])
  register()
  await import("../src/cli.ts")
}
