"use strict";
// A feature page: contexts highlighted by activation, explanation and scores, steering, partners in the other seeds.
(function () {
  function contextLine(context, scale) {
    var line = el("div", { cls: "context" });
    context.tokens.forEach(function (token, position) {
      var value = context.activations[position] || 0, strength = scale > 0 ? Math.min(value / scale, 1) : 0;
      var span = el("span", { cls: "tok" + (value > 0 ? " active" : ""), text: token, title: "activation " + fmt(value) });
      if (value > 0) span.style.backgroundColor = "rgba(255, 120, 0, " + (0.15 + 0.85 * strength).toFixed(3) + ")";
      line.appendChild(span);
    });
    return line;
  }
  function contextsBlock(contexts) {
    var block = el("div", { cls: "contexts" });
    if (!contexts || !contexts.top) { block.appendChild(el("p", { cls: "muted", text: "no contexts mined" })); return block; }
    var scale = contexts.max_activation || 0;
    block.appendChild(el("p", { cls: "muted", text: "max activation " + fmt(scale) + ", fires on " + contexts.n_firing_tokens + " cached tokens" }));
    block.appendChild(el("h3", { text: "Top activating" }));
    contexts.top.forEach(function (context) { block.appendChild(contextLine(context, scale)); });
    contexts.quantiles.forEach(function (quantile, number) {
      block.appendChild(el("h3", { text: "Quantile " + (number + 1) + " of " + contexts.quantiles.length + " (lowest first)" }));
      quantile.forEach(function (context) { block.appendChild(contextLine(context, scale)); });
    });
    return block;
  }
  function steeringBlock(examples) {
    if (!examples.length) return el("p", { cls: "muted", text: "not steered" });
    var judges = Object.keys(examples[0].judges);
    var head = el("tr", {}, ["prompt", "unsteered", "steered"].concat(judges).map(function (name) { return el("th", { text: name }); }));
    return el("table", { cls: "steer", id: "steering" }, [head].concat(examples.map(function (example) {
      return el("tr", {}, [el("td", { text: example.prompt }), el("td", { text: example.unsteered }), el("td", { text: example.steered })].concat(judges.map(function (judge) {
        var verdict = example.judges[judge];
        return el("td", { text: verdict.success === null ? "\u2013" : (verdict.success ? "success" : "fail") + " (" + fmt(verdict.score) + ")" });
      })));
    })));
  }
  function render(variant, page, meta) {
    var root = document.getElementById("page");
    var scores = el("table", { cls: "figures" }, [["category", page.category], ["share count", page.share_count], ["firing frequency", fmt(page.firing_frequency, 4)],
      ["explanation", page.explanation || "(not interpreted)"], ["detection score", fmt(page.detection_score)], ["fuzzing score", fmt(page.fuzzing_score)],
      ["steering success" + (meta.success_judge ? " (" + meta.success_judge + " judge)" : ""), fmt(page.steering_success)], ["top token", page.top_token === null ? "\u2013" : JSON.stringify(page.top_token)]
    ].map(function (row) { return el("tr", {}, [el("td", { text: row[0] }), el("td", { text: String(row[1]) })]); }));
    var own = el("div", { cls: "col", id: "own" }, [el("h2", { text: "Seed " + meta.reference_seed + ", feature " + page.feature }), scores, contextsBlock(page.contexts)]);
    var columns = el("div", { cls: "cols" }, [own].concat(page.partners.map(function (partner) {
      var facts = el("table", { cls: "figures" }, [["decoder cosine", fmt(partner.decoder_cosine)], ["encoder partner", partner.encoder_partner + " (cosine " + fmt(partner.encoder_cosine) + ")"],
        ["shared (both cosines > threshold)", partner.shared ? "yes" : "no"], ["explanation", partner.explanation || "(not explained: seed not in autointerp.partner_seeds)"], ["explanation agreement (cosine)", fmt(partner.explanation_agreement)]
      ].map(function (row) { return el("tr", {}, [el("td", { text: row[0] }), el("td", { text: String(row[1]) })]); }));
      return el("div", { cls: "col partner", "data-seed": String(partner.seed) }, [el("h2", { text: "Seed " + partner.seed + ", partner " + partner.feature }), facts, contextsBlock(partner.contexts)]);
    })));
    root.replaceChildren(el("p", {}, [el("a", { href: "index.html?v=" + encodeURIComponent(variant), text: "\u2190 index" })]),
      el("h1", { text: "Feature " + page.feature + " \u2014 " + variant + " (" + meta.condition + ")" }), columns,
      el("h2", { text: "Steering: unsteered vs steered continuations" }), steeringBlock(page.steering));
    document.title = "Feature " + page.feature + " \u2014 " + variant;
  }
  document.addEventListener("DOMContentLoaded", function () {
    var params = new URLSearchParams(location.search), variant = params.get("v"), feature = params.get("f");
    var meta = window.BROWSER_SITE.conditions.filter(function (c) { return c.variant === variant; })[0];
    var root = document.getElementById("page");
    if (!meta) { root.textContent = "unknown condition " + variant; return; }
    var chunk = meta.chunk_of[feature];
    if (chunk === undefined) { root.textContent = "feature " + feature + " has no page in " + variant; return; }
    loadScript("data/" + variant + "/chunk-" + chunk + ".js").then(function () { render(variant, window.BROWSER_CHUNKS[variant + "/" + chunk][feature], meta); });
  });
})();
