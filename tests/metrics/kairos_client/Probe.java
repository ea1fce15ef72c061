// Drives KairosDB's Java client (org.kairosdb:client 3.1.1) against a metrics service and
// prints what each call returned as one JSON object (tests/metrics/test_kairos_client.py).
// Arguments: base URL, a start time in ms, and optionally a Basic auth user and password.

import com.google.gson.Gson;
import java.util.ArrayList;
import java.util.Date;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.http.auth.AuthScope;
import org.apache.http.auth.UsernamePasswordCredentials;
import org.apache.http.impl.client.BasicCredentialsProvider;
import org.apache.http.impl.client.HttpClientBuilder;
import org.kairosdb.client.HttpClient;
import org.kairosdb.client.builder.AggregatorFactory;
import org.kairosdb.client.builder.DataPoint;
import org.kairosdb.client.builder.MetricBuilder;
import org.kairosdb.client.builder.QueryBuilder;
import org.kairosdb.client.builder.QueryTagBuilder;
import org.kairosdb.client.builder.TimeUnit;
import org.kairosdb.client.builder.grouper.TagGrouper;
import org.kairosdb.client.response.GroupResult;
import org.kairosdb.client.response.QueryResponse;
import org.kairosdb.client.response.QueryResult;
import org.kairosdb.client.response.QueryTagResponse;
import org.kairosdb.client.response.Result;
import org.kairosdb.client.response.grouping.TagGroupResult;

public class Probe {
    private static final String METRIC = "jc.temp";

    public static void main(String[] args) throws Exception {
        String url = args[0];
        long t0 = Long.parseLong(args[1]);
        HttpClientBuilder builder = HttpClientBuilder.create();
        if (args.length > 3) {
            BasicCredentialsProvider credentials = new BasicCredentialsProvider();
            credentials.setCredentials(AuthScope.ANY, new UsernamePasswordCredentials(args[2], args[3]));
            builder.setDefaultCredentialsProvider(credentials);
        }
        Map<String, Object> out = new LinkedHashMap<>();
        try (HttpClient client = new HttpClient(builder, url)) {
            out.put("version", client.getVersion());
            out.put("status", client.getStatus());
            out.put("statusCheck", client.getStatusCheck());

            MetricBuilder push = MetricBuilder.getInstance();
            push.addMetric(METRIC).addTag("host", "a")
                .addDataPoint(t0, 1).addDataPoint(t0 + 60_000, 2.5).addDataPoint(t0 + 120_000, 3);
            push.addMetric(METRIC).addTag("host", "b").addDataPoint(t0, 10);
            client.pushMetrics(push);
            out.put("metricNames", client.getMetricNames());

            QueryBuilder query = QueryBuilder.getInstance();
            query.setStart(new Date(t0)).setEnd(new Date(t0 + 3_600_000));
            query.addMetric(METRIC).addGrouper(new TagGrouper("host"))
                .addAggregator(AggregatorFactory.createSumAggregator(5, TimeUnit.MINUTES));
            out.put("query", results(client.query(query)));

            QueryTagBuilder tags = QueryTagBuilder.getInstance();
            tags.setStart(new Date(t0)).setEnd(new Date(t0 + 3_600_000));
            tags.addMetric(METRIC).addTag("host", "a");
            QueryTagResponse tagResponse = client.queryTags(tags);
            out.put("queryTags", tagResponse.getQueries().get(0).getResults().get(0).getTags());

            QueryBuilder delete = QueryBuilder.getInstance();
            delete.setStart(new Date(t0 + 60_000)).setEnd(new Date(t0 + 3_600_000));
            delete.addMetric(METRIC).addTag("host", "a");
            client.delete(delete);
            QueryBuilder raw = QueryBuilder.getInstance();
            raw.setStart(new Date(t0)).setEnd(new Date(t0 + 3_600_000));
            raw.addMetric(METRIC).addTag("host", "a");
            out.put("afterDelete", results(client.query(raw)));

            client.deleteMetric(METRIC);
            out.put("metricNamesAfterDeleteMetric", client.getMetricNames());
        }
        System.out.println(new Gson().toJson(out));
    }

    private static List<Object> results(QueryResponse response) throws Exception {
        List<Object> queries = new ArrayList<>();
        for (QueryResult query : response.getQueries()) {
            List<Object> results = new ArrayList<>();
            for (Result result : query.getResults()) {
                Map<String, Object> r = new LinkedHashMap<>();
                r.put("name", result.getName());
                r.put("tags", result.getTags());
                List<Object> groups = new ArrayList<>();
                for (GroupResult group : result.getGroupResults()) {
                    if (group instanceof TagGroupResult) {
                        groups.add(((TagGroupResult) group).getGroup());
                    } else {
                        groups.add(group.getName());
                    }
                }
                r.put("groups", groups);
                List<Object> values = new ArrayList<>();
                for (DataPoint point : result.getDataPoints()) {
                    values.add(List.of(point.getTimestamp(), point.doubleValue()));
                }
                r.put("values", values);
                results.add(r);
            }
            Map<String, Object> q = new LinkedHashMap<>();
            q.put("sampleSize", query.getSampleSize());
            q.put("results", results);
            queries.add(q);
        }
        return queries;
    }
}
