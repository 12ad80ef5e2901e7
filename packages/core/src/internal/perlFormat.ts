/**
 * Number and time formatting with the semantics of the Perl code vzdump runs on: C `printf`
 * rounding (exact binary value, ties to even), `int()` truncation, `localtime`.
 *
 * @internal
 */

/**
 * `sprintf("%.<digits>f", x)` as glibc prints it: the exact binary value of `x` is rounded to
 * `digits` decimals, exact ties go to the even digit (`0.25` → `0.2`, where `toFixed` gives `0.3`).
 */
export const fixed = (x: number, digits: number): string => {
  if (!Number.isFinite(x)) return x > 0 ? "Inf" : x < 0 ? "-Inf" : "NaN"
  const negative = x < 0 || Object.is(x, -0)
  const abs = Math.abs(x)
  if (abs >= 1e21) return (negative ? "-" : "") + abs.toFixed(digits)
  // toFixed(100) is the exact decimal expansion for every double this code formats (>= 2^-48)
  const exact = abs.toFixed(100)
  const dot = exact.indexOf(".")
  const intPart = exact.slice(0, dot)
  const frac = exact.slice(dot + 1)
  const kept = frac.slice(0, digits)
  const rest = frac.slice(digits)
  let n = BigInt(intPart + kept)
  const first = rest.charCodeAt(0) - 48
  if (first > 5) {
    n += 1n
  } else if (first === 5) {
    const beyond = /[1-9]/.test(rest.slice(1))
    if (beyond || n % 2n === 1n) n += 1n
  }
  let digitsText = n.toString().padStart(digits + 1, "0")
  if (digits > 0) digitsText = `${digitsText.slice(0, -digits)}.${digitsText.slice(-digits)}`
  return (negative ? "-" : "") + digitsText
}

/** Perl's `int()`: truncation towards zero. */
export const int = (x: number): number => Math.trunc(x)

/** `sprintf("%02d", n)`. */
export const pad2 = (n: number): string => String(int(n)).padStart(2, "0")

/** POSIX `round()`: half away from zero. */
export const roundHalfAway = (x: number): number => Math.sign(x) * Math.round(Math.abs(x))

/** Broken-down local time, as Perl's `localtime` gives it. */
export interface TimeParts {
  readonly year: number
  readonly month: number
  readonly day: number
  readonly hour: number
  readonly minute: number
  readonly second: number
}

const formatters = new Map<string, Intl.DateTimeFormat>()

const formatterFor = (timeZone: string): Intl.DateTimeFormat => {
  let formatter = formatters.get(timeZone)
  if (formatter === undefined) {
    formatter = new Intl.DateTimeFormat("en-US", {
      timeZone,
      hourCycle: "h23",
      year: "numeric",
      month: "2-digit",
      day: "2-digit",
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit"
    })
    formatters.set(timeZone, formatter)
  }
  return formatter
}

/**
 * The wall-clock time of `date` in `timeZone` (an IANA name such as `Europe/Vienna` or `UTC`), or
 * in the process's local time zone (`TZ`) when `timeZone` is undefined.
 */
export const timeParts = (date: Date, timeZone?: string): TimeParts => {
  if (timeZone === undefined) {
    return {
      year: date.getFullYear(),
      month: date.getMonth() + 1,
      day: date.getDate(),
      hour: date.getHours(),
      minute: date.getMinutes(),
      second: date.getSeconds()
    }
  }
  const parts: Record<string, number> = {}
  for (const part of formatterFor(timeZone).formatToParts(date)) {
    if (part.type !== "literal") parts[part.type] = Number(part.value)
  }
  return {
    year: parts.year!,
    month: parts.month!,
    day: parts.day!,
    hour: parts.hour!,
    minute: parts.minute!,
    second: parts.second!
  }
}

/** `strftime("%F %H:%M:%S", localtime)`. */
export const timestamp = (date: Date, timeZone?: string): string => {
  const t = timeParts(date, timeZone)
  return `${String(t.year).padStart(4, "0")}-${pad2(t.month)}-${pad2(t.day)} ${pad2(t.hour)}:${pad2(t.minute)}:${
    pad2(t.second)
  }`
}
