#!/usr/bin/env node
// The `vma` command (src/cli.ts).
//
// Node 20 cannot run TypeScript, and loading Effect as hundreds of small ES modules costs about 0.4 s per
// start. So the CLI runs from a single-file CommonJS bundle, build/vma-cli.cjs, made by esbuild (the one tsx
// ships with) from the current sources, including those of @vzdump/core it imports: startup drops from
// ~0.6 s to ~0.2 s and peak RSS by ~30 MiB. The bundle is compiled through node:vm with V8's code cache
// (build/vma-cli.cjs.cache, written after the first run and whenever V8 rejects it), which saves most of
// the remaining compile time (~0.1 s of CPU per start). The bundle is rebuilt when any of its local inputs
// (listed in build/vma-cli.inputs.json) is newer than it or gone; files are written under temporary names
// and renamed, so concurrent starts never see half a file. If esbuild cannot be loaded or fails, the
// sources are loaded through tsx instead (slower to start, same behaviour).
import * as fs from "node:fs"
import { createRequire, Module } from "node:module"
import * as path from "node:path"
import * as vm from "node:vm"
import { fileURLToPath, pathToFileURL } from "node:url"

// Reads and writes of pipes to compressors block libuv pool threads: allow more than the default four.
process.env.UV_THREADPOOL_SIZE ??= "8"

const pkg = fileURLToPath(new URL("../", import.meta.url))
const entry = `${pkg}src/cli.ts`
const bundle = `${pkg}build/vma-cli.cjs`
const codeCache = `${bundle}.cache`
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
      format: "cjs",
      target: "node20",
      // a native addon: loaded from node_modules at run time
      external: ["zstd-napi"],
      // sources resolve files next to themselves (the zstd worker's binding) through import.meta.url
      define: { "import.meta.url": "__bundle_url" },
      banner: { js: "const __bundle_url = require(\"node:url\").pathToFileURL(__filename).href;" },
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
    fs.rmSync(codeCache, { force: true })
    fs.renameSync(`${bundle}${suffix}`, bundle)
    fs.renameSync(`${inputsFile}${suffix}`, inputsFile)
    return true
  } catch {
    fs.rmSync(`${bundle}${suffix}`, { force: true })
    fs.rmSync(`${inputsFile}${suffix}`, { force: true })
    return false
  }
}

/** Runs the CommonJS bundle, compiled with the code cache when there is a valid one. */
const runBundle = () => {
  const source = fs.readFileSync(bundle, "utf8")
  let cachedData
  try {
    cachedData = fs.readFileSync(codeCache)
  } catch {
    cachedData = undefined
  }
  const script = new vm.Script(Module.wrap(source), { filename: bundle, cachedData })
  if (cachedData === undefined || script.cachedDataRejected === true) {
    // After the run, so the functions it compiled lazily are in the cache too.
    process.once("exit", () => {
      const temporary = `${codeCache}.${process.pid}.tmp`
      try {
        fs.writeFileSync(temporary, script.createCachedData())
        fs.renameSync(temporary, codeCache)
      } catch {
        fs.rmSync(temporary, { force: true })
      }
    })
  }
  const module = { exports: {} }
  script.runInThisContext()(module.exports, createRequire(bundle), module, bundle, path.dirname(bundle))
}

if (bundleIsFresh() || await makeBundle()) {
  runBundle()
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
