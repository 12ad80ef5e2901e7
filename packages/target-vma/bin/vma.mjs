#!/usr/bin/env node
// The `vma` command (src/cli.ts).
//
// Node 20 cannot run TypeScript, and loading Effect as hundreds of small ES modules costs about 0.4 s per
// start. So the CLI runs from a single-file bundle, build/vma-cli.mjs, made by esbuild (the one tsx ships
// with) from the current sources, including those of @vzdump/core it imports: startup drops from ~0.6 s to
// ~0.2 s and peak RSS by ~30 MiB. The bundle is rebuilt when any of its local inputs (listed in
// build/vma-cli.inputs.json) is newer than it or gone; it is written under a temporary name and renamed, so
// concurrent starts never see half a file. If esbuild cannot be loaded or fails, the sources are loaded
// through tsx instead (slower to start, same behaviour).
import * as fs from "node:fs"
import { createRequire } from "node:module"
import { fileURLToPath, pathToFileURL } from "node:url"

// Reads and writes of pipes to compressors block libuv pool threads: allow more than the default four.
process.env.UV_THREADPOOL_SIZE ??= "8"

const pkg = fileURLToPath(new URL("../", import.meta.url))
const entry = `${pkg}src/cli.ts`
const bundle = `${pkg}build/vma-cli.mjs`
const inputsFile = `${pkg}build/vma-cli.inputs.json`

const bundleIsFresh = () => {
  try {
    const built = fs.statSync(bundle).mtimeMs
    const inputs = JSON.parse(fs.readFileSync(inputsFile, "utf8"))
    if (!Array.isArray(inputs) || inputs.length === 0) return false
    return inputs.every((file) => fs.statSync(file).mtimeMs <= built)
  } catch {
    return false
  }
}

const makeBundle = async () => {
  const suffix = `.${process.pid}.tmp`
  try {
    const fromTsx = createRequire(createRequire(import.meta.url).resolve("tsx/package.json"))
    const esbuild = await import(pathToFileURL(fromTsx.resolve("esbuild")).href)
    fs.mkdirSync(`${pkg}build`, { recursive: true })
    const result = await esbuild.build({
      entryPoints: [entry],
      bundle: true,
      platform: "node",
      format: "esm",
      target: "node20",
      outfile: `${bundle}${suffix}`,
      metafile: true,
      absWorkingDir: pkg,
      logLevel: "silent"
    })
    // Local sources only (not node_modules, which change only with an install): their mtimes decide freshness.
    const inputs = Object.keys(result.metafile.inputs)
      .filter((file) => !file.includes("node_modules/"))
      .map((file) => fileURLToPath(new URL(file, pathToFileURL(pkg))))
    fs.writeFileSync(`${inputsFile}${suffix}`, JSON.stringify(inputs))
    fs.renameSync(`${bundle}${suffix}`, bundle)
    fs.renameSync(`${inputsFile}${suffix}`, inputsFile)
    return true
  } catch {
    fs.rmSync(`${bundle}${suffix}`, { force: true })
    fs.rmSync(`${inputsFile}${suffix}`, { force: true })
    return false
  }
}

if (bundleIsFresh() || await makeBundle()) {
  await import(pathToFileURL(bundle).href)
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
