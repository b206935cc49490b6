// What the screens test measures in the page (tests/test_screens_browser.py): for every view
// under `root`, the problems a person would see. Returns a list of strings (empty: all good).
//   - overflow: an element whose content is wider than its box (scrollWidth > clientWidth)
//   - overlap: an axis label over the axis' tick numbers
//   - charts without axis labels or legends
//   - contrast: text under 4.5:1 and chart lines under 3:1 against what is behind them
(root) => {
  const problems = [];
  const parse = (c) => {
    const m = c && c.match(/rgba?\(([\d.]+),\s*([\d.]+),\s*([\d.]+)(?:,\s*([\d.]+))?\)/);
    return m ? [+m[1], +m[2], +m[3], m[4] === undefined ? 1 : +m[4]] : null;
  };
  const lum = ([r, g, b]) => {
    const f = (v) => {
      v /= 255;
      return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const ratio = (a, b) => {
    const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
    return (x + 0.05) / (y + 0.05);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c[3] > 0.5) return c;
    }
    return [255, 255, 255, 1];
  };
  const name = (el) =>
    `${el.tagName.toLowerCase()}.${[...el.classList].slice(0, 3).join('.')}` +
    (el.textContent ? ` "${el.textContent.trim().slice(0, 30)}"` : '');
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden';
  };
  for (const view of [document.querySelector(root)].filter(Boolean)) { // the first: the one scrolled to
    // overflow (html boxes; svg internals have no scroll box)
    for (const el of [view, ...view.querySelectorAll('*')]) {
      if (el instanceof SVGElement || !visible(el) || el.clientWidth === 0) continue;
      const style = getComputedStyle(el);
      if (style.display === 'inline' || style.textOverflow === 'ellipsis') continue; // cut on purpose, whole on hover
      if (el.scrollWidth > el.clientWidth + 1) {
        problems.push(`overflow: ${name(el)} ${el.scrollWidth} > ${el.clientWidth}`);
      }
    }
    // charts
    for (const fig of view.querySelectorAll('.bqplot.figure')) {
      if (!visible(fig)) continue;
      const title = fig.querySelector('.mainheading')?.textContent?.trim() || '(untitled)';
      const labels = [...fig.querySelectorAll('.axislabel')].filter((t) => t.textContent.trim());
      if (labels.length < 2) problems.push(`chart "${title}": ${labels.length} axis label(s)`);
      if (!fig.querySelector('.g_legend text.legendtext')) {
        const bars = fig.querySelector('.bargroup, .bar');
        if (!bars) problems.push(`chart "${title}": no legend`);
      }
      for (const axis of fig.querySelectorAll('.axis')) {
        const label = axis.querySelector('.axislabel');
        if (!label || !label.textContent.trim()) continue;
        const lr = label.getBoundingClientRect();
        for (const tick of axis.querySelectorAll('.tick text')) {
          const tr = tick.getBoundingClientRect();
          if (!tick.textContent.trim() || tr.width === 0) continue;
          const apart =
            lr.right <= tr.left || tr.right <= lr.left || lr.bottom <= tr.top || tr.bottom <= lr.top;
          if (!apart) {
            problems.push(`overlap: chart "${title}" label "${label.textContent}" on tick "${tick.textContent}"`);
            break;
          }
        }
      }
      const bg = background(fig);
      for (const line of fig.querySelectorAll('path.line')) {
        const c = parse(getComputedStyle(line).stroke);
        if (c && visible(line) && ratio(c, bg) < 3) {
          problems.push(`line contrast ${ratio(c, bg).toFixed(2)} in chart "${title}" (${getComputedStyle(line).stroke})`);
        }
      }
      for (const t of fig.querySelectorAll('text')) {
        if (!t.textContent.trim() || !visible(t)) continue;
        const c = parse(getComputedStyle(t).fill);
        if (c && c[3] > 0.5 && ratio(c, bg) < 4.5) {
          problems.push(`text contrast ${ratio(c, bg).toFixed(2)}: "${t.textContent.trim().slice(0, 20)}" in chart "${title}"`);
        }
      }
    }
    // html text
    for (const el of view.querySelectorAll('*')) {
      if (el instanceof SVGElement || !visible(el)) continue;
      const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
      if (!own) continue;
      const style = getComputedStyle(el);
      const c = parse(style.color);
      if (!c) continue;
      const r = ratio(c, background(el));
      const need = el.classList.contains('jupyter-llm-swatch') ? 3 : 4.5; // a colour square is a graphic
      if (r < need) problems.push(`text contrast ${r.toFixed(2)}: ${name(el)} (${style.color})`);
    }
  }
  return [...new Set(problems)];
};
