/** Small helpers shared by the benchmark scripts. */

/** The median of a non-empty list. */
export const median = (xs: ReadonlyArray<number>): number => {
  const s = [...xs].sort((a, b) => a - b)
  const m = Math.floor(s.length / 2)
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

/** `1G`, `256M`, `64MiB`, `4096` → bytes, rounded to a non-zero multiple of `granule`. */
export const parseSize = (s: string, granule: number): number => {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)i?B?$/i.exec(s)
  if (m === null) throw new Error(`bad size ${s}`)
  const units = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }
  const unit = units[m[2]!.toUpperCase() as keyof typeof units]
  return Math.max(1, Math.round((Number(m[1]) * unit) / granule)) * granule
}
