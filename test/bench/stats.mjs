// Order statistics for benchmarks: medians and tail percentiles over raw samples.
export function percentile(samples, p) {
  if (samples.length === 0) return NaN;
  const sorted = [...samples].sort((a, b) => a - b);
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[idx];
}
export const median = (s) => percentile(s, 50);
export function row(metric, unit, samples, note) {
  return { metric, unit, median: median(samples), p99: percentile(samples, 99), n: samples.length, ...(note ? { note } : {}) };
}
