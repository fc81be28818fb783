//! One self-contained HTML page about a model on a labelled data set: accuracy and confusion
//! matrix, the rule list, per-class top n-grams, and the embedding scatter as inline SVG.
//!
//! Nothing on the page is fetched: no scripts, style sheets, fonts or images from elsewhere, so
//! that it opens offline and leaks nothing about who reads it.

use std::fmt::Write;

use crate::embed::Embedding;
use crate::predict::Evaluation;
use crate::rules::RulesReport;

/// Escapes text for HTML element content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A distinct colour for class `i` of `n`, as CSS.
pub fn class_colour(i: usize, n: usize) -> String {
    let hue = (i as f64 * 360.0 / n.max(1) as f64 + 15.0) % 360.0;
    let lightness = if i.is_multiple_of(2) { 42 } else { 55 };
    format!("hsl({hue:.0},70%,{lightness}%)")
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}\
th{background:#f4f4f4}td.l,th.l{text-align:left}.diag{background:#e3f2e3;font-weight:bold}\
.warn{color:#a33}code{background:#f4f4f4;padding:0 .2em}.grid{display:flex;flex-wrap:wrap;gap:1.5em}\
.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.3em;border-radius:50%}";

/// Renders the page. `title` names the model and data.
pub fn render_report(title: &str, evaluation: &Evaluation, rules: &RulesReport, embedding: &Embedding) -> String {
    let labels = &evaluation.labels;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n",
        escape(title)
    );
    let _ = writeln!(h, "<h1>{}</h1>", escape(title));
    let _ = writeln!(
        h,
        "<p>Model: <b>{}</b>, {} classes. Accuracy on the data: <b id=\"accuracy\">{:.4}</b>.</p>",
        escape(&rules.model),
        labels.len(),
        evaluation.accuracy
    );

    // Confusion matrix.
    let _ = writeln!(h, "<h2>Confusion matrix</h2><p>Rows: true label; columns: predicted.</p>");
    let _ = write!(h, "<table id=\"confusion\"><tr><th class=\"l\">true \\ predicted</th>");
    for l in labels {
        let _ = write!(h, "<th>{}</th>", escape(l));
    }
    h.push_str("</tr>\n");
    for (i, row) in evaluation.confusion.iter().enumerate() {
        let _ = write!(h, "<tr><th class=\"l\">{}</th>", escape(&labels[i]));
        for (j, c) in row.iter().enumerate() {
            let class = if i == j { " class=\"diag\"" } else { "" };
            let _ = write!(h, "<td{class}>{c}</td>");
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");

    // Embedding scatter.
    let _ = writeln!(
        h,
        "<h2>Embedding</h2><p>Each text's pooled representation, projected on its two principal components \
         ({:.1} % and {:.1} % of the variance), coloured by the model's prediction; a ring marks a wrong prediction.</p>",
        100.0 * embedding.explained[0],
        100.0 * embedding.explained[1]
    );
    h.push_str(&scatter_svg(embedding, labels));
    h.push_str("<p>");
    for (i, l) in labels.iter().enumerate() {
        let _ = write!(
            h,
            "<span><span class=\"swatch\" style=\"background:{}\"></span>{}</span> ",
            class_colour(i, labels.len()),
            escape(l)
        );
    }
    h.push_str("</p>\n");

    // Rule list.
    let _ = writeln!(
        h,
        "<h2>Rule list</h2><p>The first rule that matches gives the class. Fidelity to the model: <b id=\"fidelity\">{:.4}</b> on {} held-out rows \
         ({:.4} on the {} rows the rules were built from). Accuracy on the held-out labels: rules {:.4}, model {:.4}.</p>",
        rules.heldout_fidelity,
        rules.heldout_rows,
        rules.build_fidelity,
        rules.build_rows,
        rules.heldout_rules_accuracy,
        rules.heldout_model_accuracy
    );
    h.push_str("<table id=\"rules\"><tr><th>#</th><th class=\"l\">rule</th><th class=\"l\">class</th><th>first to match</th><th>precision</th></tr>\n");
    for (i, r) in rules.rule_list.rules.iter().enumerate() {
        let condition = r.condition.as_ref().map(|c| format!("if the text {c}")).unwrap_or_else(|| "otherwise".into());
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{:.3}</td></tr>",
            i + 1,
            escape(&condition),
            escape(&r.label),
            r.covered,
            r.precision
        );
    }
    h.push_str("</table>\n");

    // Per-class n-grams.
    let _ = writeln!(
        h,
        "<h2>What the model looks for in each class</h2><p>Scores: {}. Precision and coverage use the model's own predictions.</p><div class=\"grid\">",
        escape(&rules.scoring)
    );
    for (class, list) in rules.top_ngrams.iter().enumerate() {
        let _ = write!(
            h,
            "<div><h3><span class=\"swatch\" style=\"background:{}\"></span>{}</h3><table class=\"ngrams\"><tr><th class=\"l\">n-gram</th><th>score</th><th>precision</th><th>coverage</th></tr>",
            class_colour(class, labels.len()),
            escape(&labels[class])
        );
        for g in list {
            let collision = if g.collides_with.is_empty() {
                String::new()
            } else {
                format!(
                    " <span class=\"warn\" title=\"shares its hash bucket with: {}\">(collision)</span>",
                    escape(&g.collides_with.join(", "))
                )
            };
            let _ = write!(
                h,
                "<tr><td class=\"l\"><code>{}</code>{collision}</td><td>{:+.3}</td><td>{:.3}</td><td>{:.4}</td></tr>",
                escape(&g.ngram),
                g.score,
                g.precision,
                g.coverage
            );
        }
        h.push_str("</table></div>\n");
    }
    h.push_str("</div>\n</body></html>\n");
    h
}

/// The scatter plot as an inline SVG element.
fn scatter_svg(embedding: &Embedding, labels: &[String]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 480.0;
    const PAD: f64 = 20.0;
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in &embedding.points {
        (x0, x1, y0, y1) = (x0.min(p.x), x1.max(p.x), y0.min(p.y), y1.max(p.y));
    }
    let sx = |x: f64| PAD + (x - x0) / (x1 - x0).max(1e-12) * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - (y - y0) / (y1 - y0).max(1e-12) * (H - 2.0 * PAD);
    let mut s = format!(
        "<svg id=\"scatter\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"embedding scatter plot\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#fafafa\" stroke=\"#ccc\"/>\n"
    );
    for p in &embedding.points {
        let colour = class_colour(p.predicted, labels.len());
        let wrong = p.label.is_some_and(|l| l != p.predicted);
        let stroke = if wrong { " stroke=\"#000\" stroke-width=\"1.2\"" } else { "" };
        let title = match p.label {
            Some(l) => format!("true {}, predicted {}", labels[l], labels[p.predicted]),
            None => format!("predicted {}", labels[p.predicted]),
        };
        let _ = writeln!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\" fill-opacity=\"0.75\"{stroke}><title>{}</title></circle>",
            sx(p.x),
            sy(p.y),
            escape(&title)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::central::testing::{generator, table, trained};
    use crate::embed::embed;
    use crate::predict::evaluate_rows;
    use crate::rules::{extract_rules, RulesConfig};
    use fl_common::ModelKind;

    /// A report on a trained fastText model over generated rows, one with markup in it.
    fn page() -> String {
        let model = trained(ModelKind::Fasttext);
        let generator = generator();
        let mut rows = generator.rows(400, 41);
        rows[0].text = "<script>alert(1)</script> see https://example.com/x.js".into();
        let data = table(&generator, &rows);
        let texts: Vec<&str> = data.texts.iter().map(String::as_str).collect();
        let labels: Vec<usize> = rows.iter().map(|r| r.label).collect();
        let evaluation = evaluate_rows(&model, &data).unwrap();
        let rules =
            extract_rules(&model, &texts[..300], &texts[300..], &labels[300..], &RulesConfig::default(), |_| {});
        let embedding = embed(&model, &texts, Some(&labels));
        render_report("model <b>x</b>", &evaluation, &rules, &embedding)
    }

    #[test]
    fn the_report_is_self_contained() {
        let page = page();
        let lower = page.to_lowercase();
        // Nothing that makes a browser fetch: no URL, no src or href, no style sheet or import.
        for forbidden in ["http:", "https:", "src=", "href=", "<link", "url(", "@import", "<script", "<iframe", "<img"]
        {
            assert!(!lower.contains(forbidden), "the report contains {forbidden:?}");
        }
        assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
        assert!(page.contains("<title>model &lt;b&gt;x&lt;/b&gt;</title>"));
        assert_eq!(page.matches("<circle ").count(), 400, "one point per row");
        assert!(page.contains("<table id=\"confusion\">") && page.contains("<table id=\"rules\">"));
        assert_eq!(page.matches("<table class=\"ngrams\">").count(), 5, "one n-gram table per class");
        assert!(page.contains("<td class=\"l\">otherwise</td>"), "the default rule");
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(escape(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_ne!(class_colour(0, 10), class_colour(1, 10));
    }
}
