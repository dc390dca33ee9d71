"use strict";
// The index: one condition at a time; its stability figures and a searchable, sortable feature list.
(function () {
  var site = window.BROWSER_SITE, state = { variant: null, sortColumn: "share_count", descending: true, query: "" };
  var LABELS = { feature: "id", category: "category", share_count: "share count", firing_frequency: "firing freq.",
    interp_score: "interp score", steering_success: "steering success", explanation: "explanation" };
  var DIGITS = { share_count: 0, firing_frequency: 4, interp_score: 3, steering_success: 3 };
  var SHOWN = ["feature", "category", "share_count", "firing_frequency", "interp_score", "steering_success", "explanation"];
  function figures(condition) {
    var table = el("table", { cls: "figures", id: "figures" }), rows = [["condition", condition.condition], ["seeds", condition.seeds.join(", ") + " (reference " + condition.reference_seed + ")"]];
    Object.keys(condition.summary.reference_counts).forEach(function (key) { rows.push(["features " + key, condition.summary.reference_counts[key]]); });
    Object.keys(condition.summary.mean_over_pairs).forEach(function (key) { rows.push([key + " (mean over seed pairs)", fmt(condition.summary.mean_over_pairs[key])]); });
    rows.forEach(function (row) { table.appendChild(el("tr", {}, [el("td", { text: row[0] }), el("td", { text: String(row[1]) })])); });
    return table;
  }
  function render() {
    var data = window.BROWSER_LISTS[state.variant], columns = data.columns, index = {};
    columns.forEach(function (name, position) { index[name] = position; });
    var query = state.query.trim().toLowerCase();
    var rows = data.rows.filter(function (row) {
      return !query || String(row[index.feature]) === query || row[index.category] === query || String(row[index.explanation]).toLowerCase().indexOf(query) >= 0;
    });
    var column = index[state.sortColumn], sign = state.descending ? -1 : 1;
    rows.sort(function (a, b) {
      var x = a[column], y = b[column];
      if (x === y) return a[index.feature] - b[index.feature];
      if (x === null) return 1; if (y === null) return -1;
      return (x < y ? -1 : 1) * sign;
    });
    var limit = site.rows_shown, body = el("tbody");
    rows.slice(0, limit).forEach(function (row) {
      var id = row[index.feature], link = row[index.page] >= 0 ? el("a", { href: "feature.html?v=" + encodeURIComponent(state.variant) + "&f=" + id, text: String(id) }) : el("span", { text: String(id) });
      body.appendChild(el("tr", { "data-feature": String(id) }, SHOWN.map(function (name) {
        if (name === "feature") return el("td", {}, [link]);
        var cell = el("td", { text: name === "explanation" ? row[index[name]] : fmt(row[index[name]], DIGITS[name]) });
        if (name === "category") cell.className = "cat-" + row[index[name]];
        return cell;
      })));
    });
    var head = el("tr", {}, SHOWN.map(function (name) {
      var th = el("th", { cls: "sortable" + (name === state.sortColumn ? (state.descending ? " sorted-desc" : " sorted-asc") : ""), "data-column": name, text: LABELS[name] });
      th.addEventListener("click", function () { state.descending = name === state.sortColumn ? !state.descending : name !== "feature"; state.sortColumn = name; render(); });
      return th;
    }));
    var table = el("table", { id: "features" }, [el("thead", {}, [head]), body]);
    var holder = document.getElementById("list");
    holder.replaceChildren(el("p", { id: "count", cls: "muted", text: rows.length + " of " + data.rows.length + " features" + (rows.length > limit ? " (first " + limit + " shown)" : "") + "; linked ids have a page" }), table);
  }
  function show(variant) {
    state.variant = variant;
    var condition = site.conditions.filter(function (c) { return c.variant === variant; })[0];
    var panel = document.getElementById("condition");
    panel.replaceChildren(el("h2", { text: condition.variant + "  (" + condition.condition + ")" }), figures(condition));
    if (condition.histogram) panel.appendChild(el("img", { src: condition.histogram, alt: "max cosine histogram", style: "max-width: 36em; display: block; margin-top: 0.6em" }));
    var done = window.BROWSER_LISTS[variant] ? Promise.resolve() : loadScript("data/" + variant + "/list.js");
    done.then(render);
  }
  document.addEventListener("DOMContentLoaded", function () {
    var picker = document.getElementById("variant");
    site.conditions.forEach(function (c) { picker.appendChild(el("option", { value: c.variant, text: c.variant + "  (" + c.condition + ")" })); });
    picker.addEventListener("change", function () { show(picker.value); });
    document.getElementById("search").addEventListener("input", function (event) { state.query = event.target.value; render(); });
    var wanted = new URLSearchParams(location.search).get("v");
    if (wanted && site.conditions.some(function (c) { return c.variant === wanted; })) picker.value = wanted;
    show(picker.value);
  });
})();
