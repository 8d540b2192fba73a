//! ZStack query conditions -> parameterised SQL.
//!
//! Every `Query*` method takes ZStack's query shape: `conditions` (strings such as
//! `uuid=…`, `name~=%web%`, `totalCapacity>100`, `state?=Enabled,Disabled`,
//! `description is null`), AND-ed, plus `limit`, `start`, `count`, `sortBy`,
//! `sortDirection` and `replyWithCount`.
//!
//! A [`Schema`] lists the fields an inventory may be queried by and the column behind each.
//! Field names are checked against it (an unknown field is an error naming it); values are
//! always bound as SQL parameters, never spliced into the statement, so a value such as
//! `x' OR 1=1 --` is just a string that matches nothing.

use std::fmt;
use vmbackup_store::error::shorten;

use rusqlite::types::Value;

/// How a field's values compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// Text compared as text; `~=` is SQL LIKE with `%` and `_` wildcards.
    Text,
    /// 64-bit integer.
    Int,
    /// Timestamp stored as Unix milliseconds; values are RFC 3339 or Unix milliseconds.
    Time,
    /// A list of strings kept in a side table `table(fk, value)`; a condition matches when
    /// any element matches (`!=`, `!?=` and `!~=`: when none does).
    TextList {
        /// Side table holding one row per element.
        table: &'static str,
        /// Column of the side table naming the owning row's key.
        fk: &'static str,
    },
}

/// One queryable field of an inventory.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The API's (camelCase) name, as in the inventory's JSON.
    pub name: &'static str,
    /// SQL column of the main table (for lists: the value column of the side table).
    pub column: &'static str,
    /// How values compare.
    pub ty: FieldType,
}

/// The queryable fields of one inventory and the table behind them.
#[derive(Debug)]
pub struct Schema {
    /// Main table, aliased `t` in generated SQL.
    pub table: &'static str,
    /// Primary key column of the main table.
    pub key: &'static str,
    /// Queryable fields.
    pub fields: &'static [Field],
    /// Sort used when `sortBy` is empty.
    pub default_sort: &'static str,
}

/// The query part of a `Query*` request.
#[derive(Debug, Clone, Default)]
pub struct QueryParams {
    /// Conditions, AND-ed.
    pub conditions: Vec<String>,
    /// At most this many rows (default [`DEFAULT_LIMIT`]).
    pub limit: Option<i32>,
    /// Rows to skip.
    pub start: Option<i32>,
    /// Reply with the total only.
    pub count: bool,
    /// Field to sort by.
    pub sort_by: String,
    /// `asc` or `desc`.
    pub sort_direction: String,
    /// Reply with rows and the total.
    pub reply_with_count: bool,
}

/// Rows returned when `limit` is absent (ZStack's default).
pub const DEFAULT_LIMIT: i64 = 1000;
/// Largest `limit` accepted.
pub const MAX_LIMIT: i64 = 100_000;
/// Most conditions in one query.
pub const MAX_CONDITIONS: usize = 64;
/// Longest condition string accepted.
pub const MAX_CONDITION_LEN: usize = 4096;

/// What was wrong with a query; `field` is the request field to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    /// Request field at fault: `conditions`, `sortBy`, `limit`, …
    pub field: &'static str,
    /// What exactly was wrong.
    pub message: String,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for QueryError {}

fn err(field: &'static str, message: impl Into<String>) -> QueryError {
    QueryError { field, message: message.into() }
}

/// A comparison operator of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `>`
    Gt,
    /// `<`
    Lt,
    /// `>=`
    Ge,
    /// `<=`
    Le,
    /// `?=` (in a comma-separated list)
    In,
    /// `!?=`
    NotIn,
    /// `~=` (SQL LIKE)
    Like,
    /// `!~=`
    NotLike,
    /// `is null`
    IsNull,
    /// `not null`
    NotNull,
}

/// A parsed condition: field, operator, raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Field name as written.
    pub field: String,
    /// Operator.
    pub op: Op,
    /// Value as written (empty for `is null` / `not null`).
    pub value: String,
}

/// Operators in the order they must be tried (longest first where one is a prefix of another).
const OPERATORS: &[(&str, Op)] = &[
    ("!?=", Op::NotIn),
    ("!~=", Op::NotLike),
    ("?=", Op::In),
    ("~=", Op::Like),
    ("!=", Op::Ne),
    (">=", Op::Ge),
    ("<=", Op::Le),
    ("=", Op::Eq),
    (">", Op::Gt),
    ("<", Op::Lt),
];

/// Parses one condition string.
pub fn parse_condition(text: &str) -> Result<Condition, QueryError> {
    if text.len() > MAX_CONDITION_LEN {
        return Err(err("conditions", format!("condition longer than {MAX_CONDITION_LEN} bytes")));
    }
    let trimmed = text.trim_start();
    let name_len =
        trimmed.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(trimmed.len());
    let (field, rest) = trimmed.split_at(name_len);
    if field.is_empty() {
        return Err(err(
            "conditions",
            format!("malformed condition {}: it must start with a field name", shorten(text)),
        ));
    }
    let word = rest.trim();
    if word.eq_ignore_ascii_case("is null") {
        return Ok(Condition { field: field.to_string(), op: Op::IsNull, value: String::new() });
    }
    if word.eq_ignore_ascii_case("not null") {
        return Ok(Condition { field: field.to_string(), op: Op::NotNull, value: String::new() });
    }
    for (token, op) in OPERATORS {
        if let Some(value) = rest.strip_prefix(token) {
            return Ok(Condition { field: field.to_string(), op: *op, value: value.to_string() });
        }
    }
    Err(err(
        "conditions",
        format!(
            "malformed condition {}: expected an operator (=, !=, >, <, >=, <=, ?=, !?=, ~=, !~=, is null, not null) after {}",
            shorten(text),
            shorten(field)
        ),
    ))
}

/// A query ready to run: WHERE clause with its parameters, ORDER BY, LIMIT/OFFSET.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `WHERE …` (or empty).
    pub where_sql: String,
    /// Parameters of `where_sql`, in order.
    pub params: Vec<Value>,
    /// `ORDER BY …`.
    pub order_sql: String,
    /// Rows to return.
    pub limit: i64,
    /// Rows to skip.
    pub offset: i64,
    /// Whether rows are wanted (false with `count`).
    pub want_rows: bool,
    /// Whether the total is wanted (`count` or `replyWithCount`).
    pub want_total: bool,
}

impl Schema {
    fn field(&self, name: &str, request_field: &'static str) -> Result<&Field, QueryError> {
        self.fields.iter().find(|f| f.name == name).ok_or_else(|| {
            let known: Vec<_> = self.fields.iter().map(|f| f.name).collect();
            err(request_field, format!("unknown field {}; queryable fields are {}", shorten(name), known.join(", ")))
        })
    }

    /// Checks `params` against this schema and builds the SQL plan.
    pub fn plan(&self, params: &QueryParams) -> Result<Plan, QueryError> {
        if params.conditions.len() > MAX_CONDITIONS {
            return Err(err("conditions", format!("at most {MAX_CONDITIONS} conditions are accepted")));
        }
        let mut clauses = Vec::new();
        let mut values = Vec::new();
        for text in &params.conditions {
            let cond = parse_condition(text)?;
            let field = self.field(&cond.field, "conditions")?;
            clauses.push(self.clause(field, &cond, text, &mut values)?);
        }
        let where_sql = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };

        let sort_field = if params.sort_by.is_empty() { self.default_sort } else { params.sort_by.as_str() };
        let field = self.field(sort_field, "sortBy")?;
        if matches!(field.ty, FieldType::TextList { .. }) {
            return Err(err("sortBy", format!("cannot sort by the list field {:?}", field.name)));
        }
        let direction = match params.sort_direction.to_ascii_lowercase().as_str() {
            "" | "asc" => "ASC",
            "desc" => "DESC",
            other => return Err(err("sortDirection", format!("{} is not asc or desc", shorten(other)))),
        };
        // The key breaks ties so that paging with start/limit is stable.
        let order_sql = format!("ORDER BY t.{} {direction}, t.{} ASC", field.column, self.key);

        let limit = match params.limit {
            None => DEFAULT_LIMIT,
            Some(l) if (0..=MAX_LIMIT).contains(&i64::from(l)) => i64::from(l),
            Some(l) => return Err(err("limit", format!("{l} is outside 0..={MAX_LIMIT}"))),
        };
        let offset = match params.start {
            None => 0,
            Some(s) if s >= 0 => i64::from(s),
            Some(s) => return Err(err("start", format!("{s} is negative"))),
        };
        Ok(Plan {
            where_sql,
            params: values,
            order_sql,
            limit,
            offset,
            want_rows: !params.count,
            want_total: params.count || params.reply_with_count,
        })
    }

    fn clause(
        &self,
        field: &Field,
        cond: &Condition,
        text: &str,
        values: &mut Vec<Value>,
    ) -> Result<String, QueryError> {
        let typed = |raw: &str| {
            typed_value(field.ty, raw).map_err(|m| err("conditions", format!("condition {}: {m}", shorten(text))))
        };
        let list = |raw: &str| -> Result<Vec<Value>, QueryError> { raw.split(',').map(|v| typed(v.trim())).collect() };
        let placeholders = |n: usize| vec!["?"; n].join(", ");
        match field.ty {
            FieldType::TextList { table, fk } => {
                let col = field.column;
                let key = self.key;
                let exists = |inner: &str| format!("EXISTS (SELECT 1 FROM {table} l WHERE l.{fk} = t.{key}{inner})");
                Ok(match cond.op {
                    Op::Eq | Op::Ne => {
                        values.push(typed(&cond.value)?);
                        let e = exists(&format!(" AND l.{col} = ?"));
                        if cond.op == Op::Eq { e } else { format!("NOT {e}") }
                    }
                    Op::In | Op::NotIn => {
                        let vs = list(&cond.value)?;
                        let e = exists(&format!(" AND l.{col} IN ({})", placeholders(vs.len())));
                        values.extend(vs);
                        if cond.op == Op::In { e } else { format!("NOT {e}") }
                    }
                    Op::Like | Op::NotLike => {
                        values.push(typed(&cond.value)?);
                        let e = exists(&format!(" AND l.{col} LIKE ?"));
                        if cond.op == Op::Like { e } else { format!("NOT {e}") }
                    }
                    Op::IsNull => format!("NOT {}", exists("")),
                    Op::NotNull => exists(""),
                    Op::Gt | Op::Lt | Op::Ge | Op::Le => {
                        return Err(err(
                            "conditions",
                            format!(
                                "condition {}: {} is a list; use =, !=, ?=, !?=, ~=, !~=, is null or not null",
                                shorten(text),
                                field.name
                            ),
                        ));
                    }
                })
            }
            FieldType::Text | FieldType::Int | FieldType::Time => {
                let col = format!("t.{}", field.column);
                Ok(match cond.op {
                    Op::IsNull => format!("{col} IS NULL"),
                    Op::NotNull => format!("{col} IS NOT NULL"),
                    Op::In | Op::NotIn => {
                        let vs = list(&cond.value)?;
                        let not = if cond.op == Op::NotIn { "NOT " } else { "" };
                        let s = format!("{col} {not}IN ({})", placeholders(vs.len()));
                        values.extend(vs);
                        s
                    }
                    Op::Like | Op::NotLike => {
                        if field.ty != FieldType::Text {
                            return Err(err(
                                "conditions",
                                format!(
                                    "condition {}: ~= and !~= apply to text fields, {} is a number",
                                    shorten(text),
                                    field.name
                                ),
                            ));
                        }
                        values.push(Value::Text(cond.value.clone()));
                        let not = if cond.op == Op::NotLike { "NOT " } else { "" };
                        format!("{col} {not}LIKE ?")
                    }
                    op => {
                        values.push(typed(&cond.value)?);
                        let sql_op = match op {
                            Op::Eq => "=",
                            Op::Ne => "!=",
                            Op::Gt => ">",
                            Op::Lt => "<",
                            Op::Ge => ">=",
                            _ => "<=",
                        };
                        format!("{col} {sql_op} ?")
                    }
                })
            }
        }
    }
}

/// Result of a query: the page of records and, when asked, the total.
#[derive(Debug, Default)]
pub struct QueryResult<T> {
    /// Records of the page.
    pub rows: Vec<T>,
    /// Total matching records, when asked for.
    pub total: Option<i64>,
}

/// Runs `params` against `schema`'s table: `columns` (comma-separated, unqualified) are
/// selected and each row is mapped by `from_row`.
pub fn run_query<T>(
    conn: &rusqlite::Connection,
    schema: &Schema,
    columns: &str,
    params: &QueryParams,
    from_row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<QueryResult<T>, super::CatalogError> {
    let plan = schema.plan(params)?;
    let table = schema.table;
    let total = if plan.want_total {
        let sql = format!("SELECT COUNT(*) FROM {table} t {}", plan.where_sql);
        Some(conn.query_row(&sql, rusqlite::params_from_iter(plan.params.iter()), |r| r.get(0))?)
    } else {
        None
    };
    let mut rows = Vec::new();
    if plan.want_rows {
        let qualified: Vec<String> = columns.split(',').map(|c| format!("t.{}", c.trim())).collect();
        let sql = format!(
            "SELECT {} FROM {table} t {} {} LIMIT {} OFFSET {}",
            qualified.join(", "),
            plan.where_sql,
            plan.order_sql,
            plan.limit,
            plan.offset
        );
        let mut stmt = conn.prepare(&sql)?;
        rows = stmt.query_map(rusqlite::params_from_iter(plan.params.iter()), from_row)?.collect::<Result<_, _>>()?;
    }
    Ok(QueryResult { rows, total })
}

fn typed_value(ty: FieldType, raw: &str) -> Result<Value, String> {
    match ty {
        FieldType::Text | FieldType::TextList { .. } => Ok(Value::Text(raw.to_string())),
        FieldType::Int => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("value {} is not an integer", shorten(raw))),
        FieldType::Time => parse_time_millis(raw.trim()).map(Value::Integer).ok_or_else(|| {
            format!(
                "value {} is not a timestamp (RFC 3339, e.g. 2026-01-02T03:04:05Z, or Unix milliseconds)",
                shorten(raw)
            )
        }),
    }
}

/// Parses an RFC 3339 timestamp or Unix milliseconds into Unix milliseconds.
pub fn parse_time_millis(raw: &str) -> Option<i64> {
    if let Ok(ms) = raw.parse::<i64>() {
        return Some(ms);
    }
    let ts: vmbackup_proto::Timestamp = serde_json::from_value(serde_json::Value::String(raw.to_string())).ok()?;
    ts.seconds.checked_mul(1000)?.checked_add(i64::from(ts.nanos / 1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[Field] = &[
        Field { name: "uuid", column: "uuid", ty: FieldType::Text },
        Field { name: "name", column: "name", ty: FieldType::Text },
        Field { name: "totalCapacity", column: "total_capacity", ty: FieldType::Int },
        Field { name: "createDate", column: "create_date", ty: FieldType::Time },
        Field {
            name: "attachedZoneUuids",
            column: "zone_uuid",
            ty: FieldType::TextList { table: "zones", fk: "owner" },
        },
    ];
    const SCHEMA: Schema = Schema { table: "things", key: "uuid", fields: FIELDS, default_sort: "createDate" };

    fn q(conds: &[&str]) -> QueryParams {
        QueryParams { conditions: conds.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn parse_each_operator() {
        let cases = [
            ("a=1", Op::Eq, "1"),
            ("a!=1", Op::Ne, "1"),
            ("a>1", Op::Gt, "1"),
            ("a<1", Op::Lt, "1"),
            ("a>=1", Op::Ge, "1"),
            ("a<=1", Op::Le, "1"),
            ("a?=1,2", Op::In, "1,2"),
            ("a!?=1,2", Op::NotIn, "1,2"),
            ("a~=%x%", Op::Like, "%x%"),
            ("a!~=%x%", Op::NotLike, "%x%"),
            ("a is null", Op::IsNull, ""),
            ("a not null", Op::NotNull, ""),
            ("a==b", Op::Eq, "=b"),
        ];
        for (text, op, value) in cases {
            let c = parse_condition(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((c.field.as_str(), c.op, c.value.as_str()), ("a", op, value), "{text}");
        }
    }

    #[test]
    fn malformed_conditions_are_refused_with_the_text() {
        for text in ["", "=x", "name", "name ~ x", "name is nul", "!name=x"] {
            let e = parse_condition(text).expect_err(text);
            assert_eq!(e.field, "conditions");
            assert!(e.message.contains("malformed"), "{text}: {}", e.message);
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let e = SCHEMA.plan(&q(&["colour=red"])).expect_err("unknown");
        assert!(e.message.contains("\"colour\""), "{}", e.message);
    }

    #[test]
    fn values_are_bound_never_spliced() {
        let p = SCHEMA.plan(&q(&["name=x' OR 1=1 --"])).expect("plan");
        assert_eq!(p.where_sql, "WHERE t.name = ?");
        assert_eq!(p.params, vec![Value::Text("x' OR 1=1 --".into())]);
    }

    #[test]
    fn non_integer_value_for_int_field_is_refused() {
        let e = SCHEMA.plan(&q(&["totalCapacity>lots"])).expect_err("int");
        assert!(e.message.contains("not an integer"), "{}", e.message);
    }

    #[test]
    fn time_values_accept_rfc3339_and_millis() {
        assert_eq!(parse_time_millis("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_time_millis("1500"), Some(1500));
        assert_eq!(parse_time_millis("yesterday"), None);
    }

    #[test]
    fn list_fields_use_exists() {
        let p = SCHEMA.plan(&q(&["attachedZoneUuids!?=a,b"])).expect("plan");
        assert_eq!(
            p.where_sql,
            "WHERE NOT EXISTS (SELECT 1 FROM zones l WHERE l.owner = t.uuid AND l.zone_uuid IN (?, ?))"
        );
        assert!(SCHEMA.plan(&q(&["attachedZoneUuids>a"])).is_err());
    }

    #[test]
    fn paging_and_sorting_are_validated() {
        let mut p = q(&[]);
        p.sort_by = "name".into();
        p.sort_direction = "DESC".into();
        p.limit = Some(5);
        p.start = Some(10);
        let plan = SCHEMA.plan(&p).expect("plan");
        assert_eq!(plan.order_sql, "ORDER BY t.name DESC, t.uuid ASC");
        assert_eq!((plan.limit, plan.offset), (5, 10));
        p.sort_direction = "sideways".into();
        assert_eq!(SCHEMA.plan(&p).expect_err("dir").field, "sortDirection");
        p.sort_direction = String::new();
        p.start = Some(-1);
        assert_eq!(SCHEMA.plan(&p).expect_err("start").field, "start");
        p.start = None;
        p.limit = Some(-3);
        assert_eq!(SCHEMA.plan(&p).expect_err("limit").field, "limit");
        p.limit = None;
        p.sort_by = "nope".into();
        assert_eq!(SCHEMA.plan(&p).expect_err("sort").field, "sortBy");
    }
}
